"""Triton kernels for the multi-bin adaptive average pool: ``pool_forward`` and ``pool_backward``.

Both directions use the *separable* form of adaptive pooling. For packed cell ``q`` (bin ``k``, row
cell ``i``, column cell ``j``, see :mod:`psp_kernels.geometry`):

    pooled[n, c, q] = inv_area[q] * sum_h [h in rowwin(q)] * sum_w [w in colwin(j_q)] * x[n, c, h, w]

The *column cells* of all bins are numbered globally, ``jc in [0, J)`` with ``J = sum(bins)`` (bin k's
columns at ``col_offset_k + j``); ``colidx[q]`` is cell q's column cell. Per image row h the kernels do

    u[c, jc]   = sum_w x[c, h, w] * ColMask[w, jc]      (tl.dot, K = W: sum the row over each column window)
    acc[c, q] += sum_jc u[c, jc] * RowSel_h[jc, q]      (tl.dot, K = J: add it to the cells whose rows hold h)

with ``ColMask[w, jc] = [cs_jc <= w < ce_jc]`` and ``RowSel_h[jc, q] = [colidx_q == jc][rs_q <= h < re_q]``
built in registers from small int tables (one entry per cell / column cell). The masks are exact 0/1,
so fp16/bf16 inputs run the first product on tensor cores with exact products and fp32 accumulation.
The backward is the transpose (a gather: every grad_x element is one program's sum over the cells that
contain it, 1/area folded into g):

    t[c, jc]         = sum_q (g[c, q] * inv_area[q]) * RowSel_h[jc, q]
    grad_x[c, h, w]  = sum_jc t[c, jc] * ColMask[w, jc]

Windows are exactly ``nn.AdaptiveAvgPool2d``'s (``geometry.window``): they may overlap and, when the map
is smaller than the bin, repeat rows/columns; the tables encode that directly.

Known deviation: the masked products multiply every loaded element by 0 or 1, so a non-finite input
(inf/nan) turns every cell of its (n, c) row into nan (the reference keeps it to the cells containing it).

Cost (for issue 3): per x element, 2*J_PAD flops in the first product plus 2*J_PAD*S_PAD/W in the
second (about 27 FMA at W = 90 for the default bins); fp32 runs both with input_precision="ieee"
(CUDA cores), where "tf32x3" or a bf16 hi/lo split of x would move the first product to tensor cores.
When H and W are multiples of every bin (60, 90 with bins 1/2/3/6) the windows nest and a finer cell
table would do (performance.md, design b).

"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets, packed_size, window
from .common import SIG_DTYPE, CompileConfig, acc_tl, dot_upcast, flat_hw_stride, load_cell_tables, pow2

# --------------------------------------------------------------------------------------------------
# Bin tables
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _pool_tables_host(bins: tuple[int, ...], height: int, width: int):
    """Host-side pooling tables (see module docstring); padded entries are empty windows."""
    s, j = packed_size(bins), sum(bins)
    s_pad, j_pad = pow2(s), pow2(j)
    cell = [[0] * s_pad for _ in range(3)]          # rows: rs, re, colidx (-1 = padding)
    cell[2] = [-1] * s_pad
    col = [[0] * j_pad for _ in range(2)]           # rows: cs, ce
    inv_area = [0.0] * s_pad
    col_off = 0
    for b, off in zip(bins, bin_offsets(bins)):
        for jj in range(b):
            col[0][col_off + jj], col[1][col_off + jj] = window(jj, b, width)
        for i in range(b):
            rs, re = window(i, b, height)
            for jj in range(b):
                q = off + i * b + jj
                cs, ce = window(jj, b, width)
                cell[0][q], cell[1][q], cell[2][q] = rs, re, col_off + jj
                inv_area[q] = 1.0 / ((re - rs) * (ce - cs))
        col_off += b
    return s, s_pad, j_pad, cell, col, inv_area


_TABLE_CACHE: dict = {}


def pool_tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """Device tables for (bins, H, W): ``(S, S_PAD, J_PAD, cell_tab [3, S_PAD] i32, col_tab [2, J_PAD]
    i32, inv_area [S_PAD] acc dtype)``. Cached per device, so a CUDA-graph capture after a warm-up call
    performs no host-to-device copy."""
    key = (tuple(bins), height, width, acc_dtype(dtype), str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        s, s_pad, j_pad, cell, col, inv_area = _pool_tables_host(tuple(bins), height, width)
        hit = (s, s_pad, j_pad,
               torch.tensor(cell, dtype=torch.int32, device=device),
               torch.tensor(col, dtype=torch.int32, device=device),
               torch.tensor(inv_area, dtype=acc_dtype(dtype), device=device))
        _TABLE_CACHE[key] = hit
    return hit


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _pool_fwd_kernel(
    x_ptr,                      # [N, C, H, W], any strides (NCHW or channels_last)
    out_ptr,                    # [N, C, S] contiguous, x's dtype
    cell_ptr,                   # i32 [3, S_PAD]: row-window start, end, column cell of each packed cell
    col_ptr,                    # i32 [2, J_PAD]: column-window start, end of each column cell
    inv_area_ptr,               # acc [S_PAD]: 1 / window area (0 for padding)
    C, H, W, S,
    stride_xn, stride_xc, stride_xh, stride_xw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr, J_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # Decomposition: one program per (n, block of BLOCK_C channels); it streams its [BLOCK_C, H, W] slab
    # of x exactly once, row by row, and owns all S output cells of those channels (no atomics, fixed
    # order). Tiles are [BLOCK_C, BLOCK_W]; with channels_last the channel dim is the contiguous one,
    # with NCHW the w dim is (the compiler coalesces along whichever stride is 1).
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    n = pid // n_cblocks
    offs_c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    q, rs, re, colidx, jc, cs, ce = load_cell_tables(cell_ptr, col_ptr, S_PAD, J_PAD)
    # RowSel_h[jc, q] = [colidx_q == jc] * [rs_q <= h < re_q]; the first factor is h-independent.
    same_col = colidx[None, :] == jc[:, None]                            # [J_PAD, S_PAD]

    x_rows = x_ptr + n.to(tl.int64) * stride_xn + offs_c.to(tl.int64)[:, None] * stride_xc
    acc = tl.zeros([BLOCK_C, S_PAD], dtype=ACC_DTYPE)
    for h in range(0, H):
        u = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            xt = tl.load(x_rows + h * stride_xh + offs_w[None, :] * stride_xw,
                         mask=mask_c[:, None] & (offs_w[None, :] < W), other=0.0)
            in_col = (offs_w[:, None] >= cs[None, :]) & (offs_w[:, None] < ce[None, :])   # [BLOCK_W, J_PAD]
            if DOT_UPCAST:
                xt = xt.to(ACC_DTYPE)
            u = tl.dot(xt, in_col.to(xt.dtype), u, input_precision="ieee")
        row_sel = same_col & (rs[None, :] <= h) & (h < re[None, :])
        acc = tl.dot(u, row_sel.to(ACC_DTYPE), acc, input_precision="ieee")

    acc = acc * tl.load(inv_area_ptr + q)[None, :]
    out = out_ptr + (n.to(tl.int64) * C + offs_c.to(tl.int64))[:, None] * S + q[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & (q[None, :] < S))


# Block configs, (BLOCK_C, BLOCK_W, num_warps). The launcher picks one with :func:`_pool_config`; the
# compile test builds every one of them. "main" tiles [32 channels, 64 columns] coalesce in both
# layouts (>= 64 contiguous bytes per channel row in NCHW, per pixel in channels_last); "small" serves
# fp64 (register pressure) and shapes with too few programs to fill an H100 (132 SMs).
# Issue 3 (H100 tuning) replaces these heuristics with measured ones.
POOL_FWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}
POOL_BWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}


def _pool_config(dtype: torch.dtype, programs_main: int, width: int) -> str:
    if dtype == torch.float64 or programs_main < 132 or width <= 16:
        return "small"
    return "main"


def pool_forward(x: torch.Tensor, bins: Sequence[int], *, config: str | None = None) -> torch.Tensor:
    """Adaptive average pooling of ``x`` to every bin in one pass over x.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last (read in place).
        bins: bin sizes, in packed order.
        config: force a ``POOL_FWD_CONFIGS`` entry (tests, tuning); default: heuristic.
    Returns:
        pooled [N, C, S] contiguous, x's dtype, ``S = sum(b*b)`` (see ``geometry`` for the packing);
        accumulated in fp32 (fp64 for fp64).
    """
    n, c, h, w = x.shape
    s, s_pad, j_pad, cell_tab, col_tab, inv_area = pool_tables(bins, h, w, x.dtype, x.device)
    out = torch.empty(n, c, s, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    config = config or _pool_config(x.dtype, n * triton.cdiv(c, POOL_FWD_CONFIGS["main"][0]), w)
    bc, bw, nw = POOL_FWD_CONFIGS[config]
    grid = (n * triton.cdiv(c, bc),)
    _pool_fwd_kernel[grid](
        x, out, cell_tab, col_tab, inv_area, c, h, w, s,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad,
        ACC_DTYPE=acc_tl(x.dtype), DOT_UPCAST=dot_upcast(x.dtype), num_warps=nw)
    return out


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _pool_bwd_kernel(
    g_ptr,                      # [N, C, S] contiguous (grad of pooled)
    gx_ptr,                     # [N, C, H, W] output, NCHW or channels_last strides
    cell_ptr, col_ptr, inv_area_ptr,   # tables as in _pool_fwd_kernel
    C, H, W, S, ROWS,           # ROWS: image rows per program
    stride_gn, stride_gc, stride_gh, stride_gw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr, J_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # Decomposition: one program per (n, block of BLOCK_C channels, block of ROWS image rows). It loads
    # its [BLOCK_C, S] slice of g once (scaled by 1/area), then for every row builds the row's
    # column-cell sums t and expands them over the row with the column masks: each grad_x element is
    # written exactly once, as a fixed-order sum over the cells that contain it. No zero-fill, no atomics.
    pid = tl.program_id(0)
    n_hblocks = tl.cdiv(H, ROWS)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    hb = pid % n_hblocks
    cb = (pid // n_hblocks) % n_cblocks
    n = pid // (n_hblocks * n_cblocks)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    q, rs, re, colidx, jc, cs, ce = load_cell_tables(cell_ptr, col_ptr, S_PAD, J_PAD)
    same_col = colidx[:, None] == jc[None, :]                            # [S_PAD, J_PAD]

    row = (n.to(tl.int64) * C + offs_c.to(tl.int64)) * S
    g = tl.load(g_ptr + row[:, None] + q[None, :], mask=mask_c[:, None] & (q[None, :] < S), other=0.0)
    g = g.to(ACC_DTYPE) * tl.load(inv_area_ptr + q)[None, :]            # [BLOCK_C, S_PAD]

    gx_rows = gx_ptr + n.to(tl.int64) * stride_gn + offs_c.to(tl.int64)[:, None] * stride_gc
    h_start = hb * ROWS
    h_end = tl.minimum(h_start + ROWS, H)
    for h in range(h_start, h_end):
        row_sel = same_col & (rs[:, None] <= h) & (h < re[:, None])     # [S_PAD, J_PAD]
        t = tl.dot(g, row_sel.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            in_col = (offs_w[None, :] >= cs[:, None]) & (offs_w[None, :] < ce[:, None])   # [J_PAD, BLOCK_W]
            val = tl.dot(t, in_col.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
            tl.store(gx_rows + h * stride_gh + offs_w[None, :] * stride_gw,
                     val.to(gx_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_w[None, :] < W))


def pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                  channels_last: bool, *, config: str | None = None) -> torch.Tensor:
    """Gradient of :func:`pool_forward` (gather formulation, deterministic, no atomics).

    Args:
        grad_pooled: [N, C, S] contiguous, fp16/bf16/fp32/fp64.
        bins, height, width: the forward's bins and x's spatial size.
        channels_last: return grad_x in channels_last instead of NCHW.
        config: force a ``POOL_BWD_CONFIGS`` entry (tests, tuning); default: heuristic.
    Returns:
        grad_x [N, C, H, W] in grad_pooled's dtype and the requested memory format.
    """
    n, c, s_in = grad_pooled.shape
    assert grad_pooled.is_contiguous()
    s, s_pad, j_pad, cell_tab, col_tab, inv_area = pool_tables(bins, height, width, grad_pooled.dtype,
                                                              grad_pooled.device)
    assert s == s_in, (s, s_in)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty(n, c, height, width, dtype=grad_pooled.dtype, device=grad_pooled.device,
                     memory_format=fmt)
    if gx.numel() == 0:
        return gx
    # Rows are split across programs below, so only the dtype and width choose the config here.
    config = config or _pool_config(grad_pooled.dtype, 1 << 30, width)
    bc, bw, nw = POOL_BWD_CONFIGS[config]
    progs = n * triton.cdiv(c, bc)
    # Split the rows so that there are enough programs (>= 4 per SM of an H100) but each still loads g
    # once for several rows.
    rows = height if progs >= 528 else max(1, height // triton.cdiv(528, progs))
    grid = (progs * triton.cdiv(height, rows),)
    _pool_bwd_kernel[grid](
        grad_pooled, gx, cell_tab, col_tab, inv_area, c, height, width, s, rows,
        gx.stride(0), gx.stride(1), gx.stride(2), gx.stride(3),
        BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, ACC_DTYPE=acc_tl(grad_pooled.dtype),
        num_warps=nw)
    return gx


# --------------------------------------------------------------------------------------------------
# Compile-only registry (tests/test_triton.py)
# --------------------------------------------------------------------------------------------------

def _fwd_signature(dt: str, acc: str) -> dict:
    return {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cell_ptr": "*i32", "col_ptr": "*i32",
            "inv_area_ptr": f"*{acc}", "C": "i32", "H": "i32", "W": "i32", "S": "i32",
            "stride_xn": "i32", "stride_xc": "i32", "stride_xh": "i32", "stride_xw": "i32",
            "BLOCK_C": "constexpr", "BLOCK_W": "constexpr", "S_PAD": "constexpr", "J_PAD": "constexpr",
            "ACC_DTYPE": "constexpr", "DOT_UPCAST": "constexpr"}


def _bwd_signature(dt: str, acc: str) -> dict:
    return {"g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "cell_ptr": "*i32", "col_ptr": "*i32",
            "inv_area_ptr": f"*{acc}", "C": "i32", "H": "i32", "W": "i32", "S": "i32", "ROWS": "i32",
            "stride_gn": "i32", "stride_gc": "i32", "stride_gh": "i32", "stride_gw": "i32",
            "BLOCK_C": "constexpr", "BLOCK_W": "constexpr", "S_PAD": "constexpr", "J_PAD": "constexpr",
            "ACC_DTYPE": "constexpr"}


# (S_PAD, J_PAD): default bins (1, 2, 3, 6) -> (64, 16); larger pyramids, e.g. (1, 2, 3, 6, 8) -> (128, 32),
# are registered for the "main" config (the largest tiles, hence the most shared memory).
_PADS = {"main": ((64, 16), (128, 32)), "small": ((64, 16),)}


def launcher_configs(dtype: torch.dtype) -> tuple[str, ...]:
    """Config names the launchers can pick for ``dtype`` (fp64 always runs "small")."""
    return ("small",) if dtype == torch.float64 else ("main", "small")


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        for name in launcher_configs(dtype):
            for (s_pad, j_pad) in _PADS[name]:
                bc, bw, nw = POOL_FWD_CONFIGS[name]
                out.append((_pool_fwd_kernel, CompileConfig(
                    f"pool_fwd/{dt}/{name}/s{s_pad}", _fwd_signature(dt, acc),
                    dict(BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, ACC_DTYPE=acc_tl(dtype),
                         DOT_UPCAST=False), num_warps=nw)))
                bc, bw, nw = POOL_BWD_CONFIGS[name]
                out.append((_pool_bwd_kernel, CompileConfig(
                    f"pool_bwd/{dt}/{name}/s{s_pad}", _bwd_signature(dt, acc),
                    dict(BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, ACC_DTYPE=acc_tl(dtype)),
                    num_warps=nw)))
    return out
