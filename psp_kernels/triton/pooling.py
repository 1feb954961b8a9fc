"""Triton kernels of the multi-bin adaptive average pool (``psp::multibin_avg_pool`` and its backward).

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

Nested path. When every bin divides the largest bin L and L divides H and W (semseg's bins 1/2/3/6 at
60x60 or 90x90, the 473 and 713 crops), the windows nest: x is summed once into the L x L *fine cells*
(``H/L x W/L`` pixels each: a row of x is loaded as an [L, W/L] tile and reduced along its second axis)
and every coarser cell is the sum of the fine cells it covers (docs/ppm_byte_model.md). The
backward forms the per-fine-cell gradient table ``D = sum_b g_b[parent_b] / area_b`` once and
broadcasts it over the cells' pixels. Both are exact selections (``tl.where``) and sums, so a
non-finite input stays in the cells that contain it.

General path (any H, W, bins): masked products, as above. Known deviation there: the masks multiply
every loaded element by 0 or 1, so a non-finite input (inf/nan) turns every cell of its (n, c) row into
nan (the reference keeps it to the cells containing it).

Fused variants: the forward can copy the x tile it has loaded into the first C channels of the PPM's
concat buffer (``multibin_avg_pool_with_concat``: x is read once for both), and the backward can add the
pass-through gradient of x while it writes grad_x (``multibin_avg_pool_backward_add``).

"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets, is_channels_last, packed_size, window
from ..table_cache import cached_table
from .common import SIG_DTYPE, CompileConfig, acc_tl, dot_upcast, load_cell_tables, pow2

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


def pool_tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """Device tables of the general path for (bins, H, W): ``(S, S_PAD, J_PAD, cell_tab [3, S_PAD] i32,
    col_tab [2, J_PAD] i32, inv_area [S_PAD] acc dtype)``, cached per device."""
    def make():
        s, s_pad, j_pad, cell, col, inv_area = _pool_tables_host(tuple(bins), height, width)
        return (s, s_pad, j_pad, torch.tensor(cell, dtype=torch.int32, device=device),
                torch.tensor(col, dtype=torch.int32, device=device),
                torch.tensor(inv_area, dtype=acc_dtype(dtype), device=device))
    return cached_table(("general", tuple(bins), height, width, acc_dtype(dtype), str(device)), make)


# Nested path limits: the largest bin L <= L_PAD (one padded tile axis), fine cells at most CW_PAD_MAX wide.
L_PAD = 8
CW_PAD_MAX = 64


def nested_level(bins: Sequence[int], height: int, width: int) -> int | None:
    """L = max(bins) when the windows nest (every bin divides L, L divides H and W) within the nested
    kernels' limits, else None (general path)."""
    big = max(bins)
    if big > L_PAD or any(big % b for b in bins) or height % big or width % big:
        return None
    return big if pow2(width // big) <= CW_PAD_MAX else None


def nested_tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """Device tables of the nested path: ``(S, fine_tab [4, S] i32, inv_area [S] acc)``; packed cell q of
    bin b covers fine rows ``[fine_tab[0, q], fine_tab[1, q])`` and fine columns ``[fine_tab[2, q],
    fine_tab[3, q])`` of the L x L fine grid (``geometry.window`` on the fine grid: exact, as b | L)."""
    big = max(bins)

    def make():
        tab = [[], [], [], []]
        for b in bins:
            for i in range(b):
                for j in range(b):
                    for row, v in zip(tab, window(i, b, big) + window(j, b, big)):
                        row.append(v)
        _, _, _, _, _, inv_area = _pool_tables_host(tuple(bins), height, width)
        s = packed_size(bins)
        return (s, torch.tensor(tab, dtype=torch.int32, device=device),
                torch.tensor(inv_area[:s], dtype=acc_dtype(dtype), device=device))
    return cached_table(("nested", tuple(bins), height, width, acc_dtype(dtype), str(device)), make)


@triton.jit
def _fine_cell_select(tab_ptr, q, S, L_PAD: tl.constexpr):
    """[L_PAD, L_PAD] mask of the fine cells that packed cell q covers (nested tables)."""
    ii = tl.arange(0, L_PAD)
    rows = (ii >= tl.load(tab_ptr + q)) & (ii < tl.load(tab_ptr + S + q))
    cols = (ii >= tl.load(tab_ptr + 2 * S + q)) & (ii < tl.load(tab_ptr + 3 * S + q))
    return rows[:, None] & cols[None, :]


@triton.jit
def _fine_tile(offs_c, C, L, CW, CW_PAD: tl.constexpr, L_PAD: tl.constexpr):
    """Offsets (in units of the w stride) and mask of a [BLOCK_C, L_PAD, CW_PAD] tile of one image row:
    element (c, j, t) is column ``j * CW + t``, i.e. pixel t of fine column cell j."""
    jj = tl.arange(0, L_PAD)
    tt = tl.arange(0, CW_PAD)
    w = jj[:, None] * CW + tt[None, :]
    mask = (offs_c < C)[:, None, None] & ((jj[:, None] < L) & (tt[None, :] < CW))[None, :, :]
    return w[None, :, :], mask


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _pool_nested_fwd_kernel(
    x_ptr,                      # [N, C, H, W], NCHW or channels_last
    out_ptr,                    # [N, C, S] contiguous, x's dtype
    cat_ptr,                    # concat [N, >=C, H, W] (written only when COPY)
    tab_ptr, inv_area_ptr,      # nested tables: i32 [4, S], acc [S]
    C, S, L, CH, CW,            # L: fine grid size; CH x CW: pixels per fine cell
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    BLOCK_C: tl.constexpr, L_PAD: tl.constexpr, CW_PAD: tl.constexpr,
    COPY: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: one program per (n, block of BLOCK_C channels); it streams its [BLOCK_C, H, W]
    # slab of x once, row by row, as [BLOCK_C, L, CW] tiles summed along the last axis into the row's
    # fine column cells, accumulates CH rows per fine row and keeps the [BLOCK_C, L, L] fine grid in
    # registers; every packed cell is then a masked sum of fine cells. Fixed order, no atomics.
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    n = (pid // n_cblocks).to(tl.int64)
    offs_c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    w, mask = _fine_tile(offs_c, C, L, CW, CW_PAD, L_PAD)
    x_tile = x_ptr + n * stride_xn + offs_c.to(tl.int64)[:, None, None] * stride_xc + w * stride_xw
    cat_tile = cat_ptr + n * stride_cn + offs_c.to(tl.int64)[:, None, None] * stride_cc + w * stride_cw
    ii = tl.arange(0, L_PAD)

    fine = tl.zeros([BLOCK_C, L_PAD, L_PAD], dtype=ACC_DTYPE)
    for i in range(0, L):
        row = tl.zeros([BLOCK_C, L_PAD], dtype=ACC_DTYPE)
        for r in range(0, CH):
            h = i * CH + r
            xt = tl.load(x_tile + h * stride_xh, mask=mask, other=0.0)
            if COPY:
                tl.store(cat_tile + h * stride_ch, xt, mask=mask)
            row += tl.sum(xt.to(ACC_DTYPE), axis=2)
        fine = tl.where((ii == i)[None, :, None], row[:, None, :], fine)

    out_rows = out_ptr + (n * C + offs_c.to(tl.int64)) * S
    for q in range(0, S):
        sel = _fine_cell_select(tab_ptr, q, S, L_PAD)
        v = tl.sum(tl.sum(tl.where(sel[None, :, :], fine, 0.0), axis=2), axis=1)
        v = v * tl.load(inv_area_ptr + q)
        tl.store(out_rows + q, v.to(out_ptr.dtype.element_ty), mask=offs_c < C)


@triton.jit
def _pool_fwd_kernel(
    x_ptr,                      # [N, C, H, W], any strides (NCHW or channels_last)
    out_ptr,                    # [N, C, S] contiguous, x's dtype
    cat_ptr,                    # concat [N, >=C, H, W] (written only when COPY)
    cell_ptr,                   # i32 [3, S_PAD]: row-window start, end, column cell of each packed cell
    col_ptr,                    # i32 [2, J_PAD]: column-window start, end of each column cell
    inv_area_ptr,               # acc [S_PAD]: 1 / window area (0 for padding)
    C, H, W, S,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr, J_PAD: tl.constexpr,
    COPY: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # Decomposition: one program per (n, block of BLOCK_C channels); it streams its [BLOCK_C, H, W] slab
    # of x exactly once, row by row, and owns all S output cells of those channels (no atomics, fixed
    # order). Tiles are [BLOCK_C, BLOCK_W]; with channels_last the channel dim is the contiguous one,
    # with NCHW the w dim is (the compiler coalesces along whichever stride is 1).
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    n = (pid // n_cblocks).to(tl.int64)
    offs_c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    q, rs, re, colidx, jc, cs, ce = load_cell_tables(cell_ptr, col_ptr, S_PAD, J_PAD)
    # RowSel_h[jc, q] = [colidx_q == jc] * [rs_q <= h < re_q]; the first factor is h-independent.
    same_col = colidx[None, :] == jc[:, None]                            # [J_PAD, S_PAD]

    x_rows = x_ptr + n * stride_xn + offs_c.to(tl.int64)[:, None] * stride_xc
    cat_rows = cat_ptr + n * stride_cn + offs_c.to(tl.int64)[:, None] * stride_cc
    acc = tl.zeros([BLOCK_C, S_PAD], dtype=ACC_DTYPE)
    for h in range(0, H):
        u = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask = mask_c[:, None] & (offs_w[None, :] < W)
            xt = tl.load(x_rows + h * stride_xh + offs_w[None, :] * stride_xw, mask=mask, other=0.0)
            if COPY:
                tl.store(cat_rows + h * stride_ch + offs_w[None, :] * stride_cw, xt, mask=mask)
            in_col = (offs_w[:, None] >= cs[None, :]) & (offs_w[:, None] < ce[None, :])   # [BLOCK_W, J_PAD]
            if DOT_UPCAST:
                xt = xt.to(ACC_DTYPE)
            u = tl.dot(xt, in_col.to(xt.dtype), u, input_precision="ieee")
        row_sel = same_col & (rs[None, :] <= h) & (h < re[None, :])
        acc = tl.dot(u, row_sel.to(ACC_DTYPE), acc, input_precision="ieee")

    acc = acc * tl.load(inv_area_ptr + q)[None, :]
    out = out_ptr + (n * C + offs_c.to(tl.int64))[:, None] * S + q[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & (q[None, :] < S))


# General-path block configs, (BLOCK_C, BLOCK_W, num_warps). "main" tiles [32 channels, 64 columns]
# coalesce in both layouts (>= 64 contiguous bytes per channel row in NCHW, per pixel in channels_last);
# "small" serves fp64 (register pressure) and shapes with too few programs to fill an H100 (132 SMs).
POOL_FWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}
POOL_BWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}
# Nested path: fine-tile width CW_PAD -> (BLOCK_C, num_warps), [BLOCK_C, 8, CW_PAD] = 4096 elements per
# row tile (32 per thread at 4 warps); few programs (N=1) or fp64 halve BLOCK_C (down to 8).
NESTED_CONFIGS = {16: (32, 4), 32: (16, 4), 64: (8, 4)}
MIN_PROGRAMS = 264          # two per SM of an H100 (132 SMs)


def _pool_config(dtype: torch.dtype, programs_main: int, width: int) -> str:
    if dtype == torch.float64 or programs_main < 132 or width <= 16:
        return "small"
    return "main"


def nested_block(dtype: torch.dtype, cw_pad: int, n: int, c: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of the nested kernels for fine cells CW_PAD wide and N x C channels."""
    block, warps = NESTED_CONFIGS[cw_pad]
    if dtype == torch.float64:
        block //= 2
    while block > 8 and n * triton.cdiv(c, block) < MIN_PROGRAMS:
        block //= 2
    return max(block, 8), warps


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _pool_forward(x: torch.Tensor, bins: Sequence[int], concat: torch.Tensor | None, config: str | None):
    n, c, h, w = x.shape
    s = packed_size(bins)
    out = torch.empty(n, c, s, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    copy, cat = concat is not None, (concat if concat is not None else x)
    big = nested_level(bins, h, w) if config in (None, "nested") else None
    if big is not None:
        _, tab, inv_area = nested_tables(bins, h, w, x.dtype, x.device)
        cw_pad = pow2(w // big)
        bc, nw = nested_block(x.dtype, cw_pad, n, c)
        _pool_nested_fwd_kernel[(n * triton.cdiv(c, bc),)](
            x, out, cat, tab, inv_area, c, s, big, h // big, w // big, *x.stride(), *_strides(concat),
            BLOCK_C=bc, L_PAD=L_PAD, CW_PAD=cw_pad, COPY=copy, ACC_DTYPE=acc_tl(x.dtype), num_warps=nw)
        return out
    s, s_pad, j_pad, cell_tab, col_tab, inv_area = pool_tables(bins, h, w, x.dtype, x.device)
    if config in (None, "nested"):
        config = _pool_config(x.dtype, n * triton.cdiv(c, POOL_FWD_CONFIGS["main"][0]), w)
    bc, bw, nw = POOL_FWD_CONFIGS[config]
    _pool_fwd_kernel[(n * triton.cdiv(c, bc),)](
        x, out, cat, cell_tab, col_tab, inv_area, c, h, w, s, *x.stride(), *_strides(concat),
        BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, COPY=copy,
        ACC_DTYPE=acc_tl(x.dtype), DOT_UPCAST=dot_upcast(x.dtype), num_warps=nw)
    return out


def multibin_avg_pool(x: torch.Tensor, bins: Sequence[int], *, config: str | None = None) -> torch.Tensor:
    """Adaptive average pooling of ``x`` to every bin in one pass over x.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last (read in place).
        bins: bin sizes, in packed order.
        config: ``"nested"`` or a ``POOL_FWD_CONFIGS`` entry (general path) to force a kernel (tests,
            tuning); default: the nested path where the windows nest, else a heuristic config.
    Returns:
        pooled [N, C, S] contiguous, x's dtype, ``S = sum(b*b)`` (see ``geometry`` for the packing);
        accumulated in fp32 (fp64 for fp64).
    """
    return _pool_forward(x, bins, None, config)


def multibin_avg_pool_with_concat(x: torch.Tensor, bins: Sequence[int], total_channels: int, *,
                                  config: str | None = None):
    """:func:`multibin_avg_pool` that also writes x into the first C channels of a new concat buffer, from the
    tiles it loads anyway (x is read once). Returns ``(pooled [N, C, S], concat [N, total_channels, H, W])``
    in x's dtype and memory format; concat's other channels are left for ``upsample_into``."""
    n, c, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    concat = torch.empty(n, total_channels, h, w, dtype=x.dtype, device=x.device, memory_format=fmt)
    return _pool_forward(x, bins, concat, config), concat


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _pool_nested_bwd_kernel(
    g_ptr,                      # [N, C, S] contiguous (grad of pooled)
    gx_ptr,                     # [N, C, H, W] output, NCHW or channels_last strides
    res_ptr,                    # residual [N, C, H, W] view (read only when HAS_RESIDUAL)
    tab_ptr, inv_area_ptr,      # nested tables: i32 [4, S], acc [S]
    C, S, L, CH, CW, ROWS,      # ROWS: image rows per program
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_rn, stride_rc, stride_rh, stride_rw,
    BLOCK_C: tl.constexpr, L_PAD: tl.constexpr, CW_PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: one program per (n, block of BLOCK_C channels, block of ROWS image rows). It forms
    # the fine-cell gradient table D[c, i, j] = sum_q [fine cell (i, j) in q] g[c, q] / area_q once
    # (fixed order over q), then writes each of its rows as the broadcast of D's fine row (plus the
    # residual): every grad_x element is written exactly once. No zero-fill, no atomics.
    pid = tl.program_id(0)
    H = L * CH
    n_hblocks = tl.cdiv(H, ROWS)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    hb = pid % n_hblocks
    n = (pid // (n_hblocks * n_cblocks)).to(tl.int64)
    offs_c = ((pid // n_hblocks) % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    w, mask = _fine_tile(offs_c, C, L, CW, CW_PAD, L_PAD)
    ii = tl.arange(0, L_PAD)

    g_rows = g_ptr + (n * C + offs_c.to(tl.int64)) * S
    table = tl.zeros([BLOCK_C, L_PAD, L_PAD], dtype=ACC_DTYPE)
    for q in range(0, S):
        gq = tl.load(g_rows + q, mask=mask_c, other=0.0).to(ACC_DTYPE) * tl.load(inv_area_ptr + q)
        sel = _fine_cell_select(tab_ptr, q, S, L_PAD)
        table += tl.where(sel[None, :, :], gq[:, None, None], 0.0)

    gx_tile = gx_ptr + n * stride_gn + offs_c.to(tl.int64)[:, None, None] * stride_gc + w * stride_gw
    res_tile = res_ptr + n * stride_rn + offs_c.to(tl.int64)[:, None, None] * stride_rc + w * stride_rw
    h_start = hb * ROWS
    for h in range(h_start, tl.minimum(h_start + ROWS, H)):
        fine_row = tl.sum(tl.where((ii == h // CH)[None, :, None], table, 0.0), axis=1)   # [BLOCK_C, L_PAD]
        val = tl.broadcast_to(fine_row[:, :, None], [BLOCK_C, L_PAD, CW_PAD])
        if HAS_RESIDUAL:
            val += tl.load(res_tile + h * stride_rh, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(gx_tile + h * stride_gh, val.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_bwd_kernel(
    g_ptr,                      # [N, C, S] contiguous (grad of pooled)
    gx_ptr,                     # [N, C, H, W] output, NCHW or channels_last strides
    res_ptr,                    # residual [N, C, H, W] view (read only when HAS_RESIDUAL)
    cell_ptr, col_ptr, inv_area_ptr,   # tables as in _pool_fwd_kernel
    C, H, W, S, ROWS,           # ROWS: image rows per program
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_rn, stride_rc, stride_rh, stride_rw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    S_PAD: tl.constexpr, J_PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
    n = (pid // (n_hblocks * n_cblocks)).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    q, rs, re, colidx, jc, cs, ce = load_cell_tables(cell_ptr, col_ptr, S_PAD, J_PAD)
    same_col = colidx[:, None] == jc[None, :]                            # [S_PAD, J_PAD]

    row = (n * C + offs_c.to(tl.int64)) * S
    g = tl.load(g_ptr + row[:, None] + q[None, :], mask=mask_c[:, None] & (q[None, :] < S), other=0.0)
    g = g.to(ACC_DTYPE) * tl.load(inv_area_ptr + q)[None, :]            # [BLOCK_C, S_PAD]

    gx_rows = gx_ptr + n * stride_gn + offs_c.to(tl.int64)[:, None] * stride_gc
    res_rows = res_ptr + n * stride_rn + offs_c.to(tl.int64)[:, None] * stride_rc
    h_start = hb * ROWS
    h_end = tl.minimum(h_start + ROWS, H)
    for h in range(h_start, h_end):
        row_sel = same_col & (rs[:, None] <= h) & (h < re[:, None])     # [S_PAD, J_PAD]
        t = tl.dot(g, row_sel.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask = mask_c[:, None] & (offs_w[None, :] < W)
            in_col = (offs_w[None, :] >= cs[:, None]) & (offs_w[None, :] < ce[:, None])   # [J_PAD, BLOCK_W]
            val = tl.dot(t, in_col.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
            if HAS_RESIDUAL:
                val += tl.load(res_rows + h * stride_rh + offs_w[None, :] * stride_rw, mask=mask,
                               other=0.0).to(ACC_DTYPE)
            tl.store(gx_rows + h * stride_gh + offs_w[None, :] * stride_gw, val.to(gx_ptr.dtype.element_ty),
                     mask=mask)


def _rows_per_program(programs: int, height: int) -> int:
    """Split the rows so that there are enough programs (>= 4 per SM of an H100) while each still
    reuses its slice of g for several rows."""
    return height if programs >= 528 else max(1, height // triton.cdiv(528, programs))


def _pool_backward(grad_pooled, bins, height, width, channels_last, residual, config):
    n, c, s_in = grad_pooled.shape
    assert grad_pooled.is_contiguous() and s_in == packed_size(bins), (grad_pooled.shape, bins)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty(n, c, height, width, dtype=grad_pooled.dtype, device=grad_pooled.device, memory_format=fmt)
    if gx.numel() == 0:
        return gx
    has_res, res = residual is not None, (residual if residual is not None else gx)
    acc = acc_tl(grad_pooled.dtype)
    big = nested_level(bins, height, width) if config in (None, "nested") else None
    if big is not None:
        s, tab, inv_area = nested_tables(bins, height, width, grad_pooled.dtype, grad_pooled.device)
        cw_pad = pow2(width // big)
        bc, nw = nested_block(grad_pooled.dtype, cw_pad, n, c)
        progs = n * triton.cdiv(c, bc)
        rows = _rows_per_program(progs, height)
        _pool_nested_bwd_kernel[(progs * triton.cdiv(height, rows),)](
            grad_pooled, gx, res, tab, inv_area, c, s, big, height // big, width // big, rows,
            *gx.stride(), *_strides(residual),
            BLOCK_C=bc, L_PAD=L_PAD, CW_PAD=cw_pad, HAS_RESIDUAL=has_res, ACC_DTYPE=acc, num_warps=nw)
        return gx
    s, s_pad, j_pad, cell_tab, col_tab, inv_area = pool_tables(bins, height, width, grad_pooled.dtype,
                                                              grad_pooled.device)
    # Rows are split across programs, so only the dtype and width choose the config here.
    if config in (None, "nested"):
        config = _pool_config(grad_pooled.dtype, 1 << 30, width)
    bc, bw, nw = POOL_BWD_CONFIGS[config]
    progs = n * triton.cdiv(c, bc)
    rows = _rows_per_program(progs, height)
    _pool_bwd_kernel[(progs * triton.cdiv(height, rows),)](
        grad_pooled, gx, res, cell_tab, col_tab, inv_area, c, height, width, s, rows,
        *gx.stride(), *_strides(residual),
        BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, HAS_RESIDUAL=has_res, ACC_DTYPE=acc, num_warps=nw)
    return gx


def multibin_avg_pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                               channels_last: bool, *, config: str | None = None) -> torch.Tensor:
    """Gradient of :func:`multibin_avg_pool` (gather formulation, deterministic, no atomics).

    Args:
        grad_pooled: [N, C, S] contiguous, fp16/bf16/fp32/fp64.
        bins, height, width: the forward's bins and x's spatial size.
        channels_last: return grad_x in channels_last instead of NCHW.
        config: as :func:`multibin_avg_pool` (``POOL_BWD_CONFIGS`` names for the general path).
    Returns:
        grad_x [N, C, H, W] in grad_pooled's dtype and the requested memory format.
    """
    return _pool_backward(grad_pooled, bins, height, width, channels_last, None, config)


def multibin_avg_pool_backward_add(grad_pooled: torch.Tensor, bins: Sequence[int], residual: torch.Tensor,
                                   channels_last: bool, *, config: str | None = None) -> torch.Tensor:
    """``residual + multibin_avg_pool_backward(grad_pooled, ...)`` in one pass: the residual (the pass-through
    gradient of x, e.g. the view ``grad_concat[:, :C]``, any strides with stride(h) == W * stride(w))
    is read while grad_x is written, summed in the accumulation dtype and rounded once."""
    _, _, h, w = residual.shape
    return _pool_backward(grad_pooled, bins, h, w, channels_last, residual, config)


# --------------------------------------------------------------------------------------------------
# Compile-only registry (tests/test_kernels_compile.py)
# --------------------------------------------------------------------------------------------------

_X_STRIDES = ("stride_xn", "stride_xc", "stride_xh", "stride_xw", "stride_cn", "stride_cc", "stride_ch",
              "stride_cw")
_G_STRIDES = ("stride_gn", "stride_gc", "stride_gh", "stride_gw", "stride_rn", "stride_rc", "stride_rh",
              "stride_rw")


def _signature(ptrs: dict, ints: Sequence[str], constexprs: Sequence[str]) -> dict:
    return {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}


def _general_configs(dtype: torch.dtype, dt: str, acc: str):
    out = []
    for name in launcher_configs(dtype):
        for (s_pad, j_pad) in _PADS[name]:
            bc, bw, nw = POOL_FWD_CONFIGS[name]
            for copy in (False, True):
                out.append((_pool_fwd_kernel, CompileConfig(
                    f"pool_fwd/{dt}/{name}/s{s_pad}/{'copy' if copy else 'pool'}",
                    _signature({"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cat_ptr": f"*{dt}", "cell_ptr": "*i32",
                                "col_ptr": "*i32", "inv_area_ptr": f"*{acc}"}, ("C", "H", "W", "S") + _X_STRIDES,
                               ("BLOCK_C", "BLOCK_W", "S_PAD", "J_PAD", "COPY", "ACC_DTYPE", "DOT_UPCAST")),
                    dict(BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, COPY=copy, ACC_DTYPE=acc_tl(dtype),
                         DOT_UPCAST=False), num_warps=nw)))
            bc, bw, nw = POOL_BWD_CONFIGS[name]
            for res in (False, True):
                out.append((_pool_bwd_kernel, CompileConfig(
                    f"pool_bwd/{dt}/{name}/s{s_pad}/{'add' if res else 'plain'}",
                    _signature({"g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "res_ptr": f"*{dt}", "cell_ptr": "*i32",
                                "col_ptr": "*i32", "inv_area_ptr": f"*{acc}"},
                               ("C", "H", "W", "S", "ROWS") + _G_STRIDES,
                               ("BLOCK_C", "BLOCK_W", "S_PAD", "J_PAD", "HAS_RESIDUAL", "ACC_DTYPE")),
                    dict(BLOCK_C=bc, BLOCK_W=bw, S_PAD=s_pad, J_PAD=j_pad, HAS_RESIDUAL=res,
                         ACC_DTYPE=acc_tl(dtype)), num_warps=nw)))
    return out


def _nested_configs(dtype: torch.dtype, dt: str, acc: str):
    out = []
    for cw_pad in NESTED_CONFIGS:
        # Every BLOCK_C nested_block can return for this width and dtype (many programs ... one image).
        blocks = sorted({nested_block(dtype, cw_pad, n, 2048) for n in (1 << 20, 1)})
        for bc, nw in blocks:
            for flag in (False, True):
                out.append((_pool_nested_fwd_kernel, CompileConfig(
                    f"pool_nested_fwd/{dt}/cw{cw_pad}/c{bc}/{'copy' if flag else 'pool'}",
                    _signature({"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cat_ptr": f"*{dt}", "tab_ptr": "*i32",
                                "inv_area_ptr": f"*{acc}"}, ("C", "S", "L", "CH", "CW") + _X_STRIDES,
                               ("BLOCK_C", "L_PAD", "CW_PAD", "COPY", "ACC_DTYPE")),
                    dict(BLOCK_C=bc, L_PAD=L_PAD, CW_PAD=cw_pad, COPY=flag, ACC_DTYPE=acc_tl(dtype)),
                    num_warps=nw)))
                out.append((_pool_nested_bwd_kernel, CompileConfig(
                    f"pool_nested_bwd/{dt}/cw{cw_pad}/c{bc}/{'add' if flag else 'plain'}",
                    _signature({"g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "res_ptr": f"*{dt}", "tab_ptr": "*i32",
                                "inv_area_ptr": f"*{acc}"}, ("C", "S", "L", "CH", "CW", "ROWS") + _G_STRIDES,
                               ("BLOCK_C", "L_PAD", "CW_PAD", "HAS_RESIDUAL", "ACC_DTYPE")),
                    dict(BLOCK_C=bc, L_PAD=L_PAD, CW_PAD=cw_pad, HAS_RESIDUAL=flag, ACC_DTYPE=acc_tl(dtype)),
                    num_warps=nw)))
    return out


# (S_PAD, J_PAD): default bins (1, 2, 3, 6) -> (64, 16); larger pyramids, e.g. (1, 2, 3, 6, 8) -> (128, 32),
# are registered for the "main" config (the largest tiles, hence the most shared memory).
_PADS = {"main": ((64, 16), (128, 32)), "small": ((64, 16),)}


def launcher_configs(dtype: torch.dtype) -> tuple[str, ...]:
    """General-path config names the launchers can pick for ``dtype`` (fp64 always runs "small")."""
    return ("small",) if dtype == torch.float64 else ("main", "small")


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        out += _general_configs(dtype, dt, acc) + _nested_configs(dtype, dt, acc)
    return out
