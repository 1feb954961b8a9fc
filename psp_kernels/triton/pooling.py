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
(``H/L x W/L`` pixels each) and every coarser cell is the sum of the fine cells it covers
(docs/ppm_byte_model.md). The forward streams each fine row as [channels, 16 rows, W chunk] tiles (all
the row's loads in flight at once, VEC-wide along w in NCHW), sums the rows elementwise, then cuts the
row sum into fine cells (``w // (W/L)``, a selection) and adds each to its column cell of every bin: the
accumulator holds one open row band of cells per bin ([channels, J]), stored (times 1/area) after the
band's last fine row. The backward gathers, per fine row, g / area of the cells holding that row, forms
the fine-cell gradient ``D = sum_b g_b[parent_b] / area_b`` of each fine column and broadcasts it over
the fine row's pixels. Both are exact selections (``tl.where``) and sums, so a non-finite input stays in
the cells that contain it.

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


# Nested path limit: the largest bin L <= L_MAX (the fine columns of a column cell are 8 bits of its table entry).
L_MAX = 8


def nested_level(bins: Sequence[int], height: int, width: int) -> int | None:
    """L = max(bins) when the windows nest (every bin divides L, L divides H and W) and L <= L_MAX, else None
    (general path)."""
    big = max(bins)
    if big > L_MAX or any(big % b for b in bins) or height % big or width % big:
        return None
    return big


def nested_tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """Device tables of the nested path: ``(S, J_PAD, row_tab [L, J_PAD] i32, inv_area [S] acc)``. Column cells
    jc are the columns of all bins (bin b's column j_b, bins in order, J = sum(bins), padded to J_PAD with
    zeros: no columns, cell 0); entry (i, jc) packs ``fine columns | last << 8 | q << 9``: bit j set for the
    fine columns j of jc's window, ``last`` when fine row i is the last of its cell's rows, and q = the
    packed index of jc's cell whose rows hold fine row i (``geometry.window`` on the L x L fine grid:
    exact, as b | L)."""
    big = max(bins)

    def make():
        tab = [[] for _ in range(big)]
        for b, off in zip(bins, bin_offsets(bins)):
            for j in range(b):
                c0, c1 = window(j, b, big)
                cols = sum(1 << k for k in range(c0, c1))
                for i in range(big):
                    row = i * b // big                  # the cell row holding fine row i
                    last = window(row, b, big)[1] == i + 1
                    tab[i].append(cols | last << 8 | (off + row * b + j) << 9)
        j_pad = pow2(sum(bins))
        tab = [row + [0] * (j_pad - len(row)) for row in tab]
        _, _, _, _, _, inv_area = _pool_tables_host(tuple(bins), height, width)
        return (packed_size(bins), j_pad, torch.tensor(tab, dtype=torch.int32, device=device),
                torch.tensor(inv_area[:packed_size(bins)], dtype=acc_dtype(dtype), device=device))
    return cached_table(("nested", tuple(bins), height, width, acc_dtype(dtype), str(device)), make)


@triton.jit
def _row_cells(tab_ptr, i, J_PAD: tl.constexpr):
    """Per column cell ([J_PAD], padding: no columns), for fine row i: its fine-column bits, whether i is the
    last fine row of its cell, and that cell's packed index (nested tables). Loaded where used (a cached
    4-byte load per column cell), so no table value stays live across the tile loops."""
    t = tl.load(tab_ptr + i * J_PAD + tl.arange(0, J_PAD))
    return t & 255, ((t >> 8) & 1) != 0, t >> 9


@triton.jit
def _row_tile(chan, i, r, CH, W, w, stride_h, stride_w, VEC: tl.constexpr, BLOCK_H: tl.constexpr):
    """Offsets and row/column mask of the [BLOCK_C, BLOCK_H, BLOCK_W] tile holding rows ``i*CH + r + [0,
    BLOCK_H)`` (those of fine row i) and columns ``w`` of the channels at ``chan`` ([BLOCK_C, 1, 1], like
    ``stride_h`` in units of VEC elements: a multiple of VEC is a VEC-aligned row start)."""
    rr = r + tl.arange(0, BLOCK_H)
    h = (i * CH + rr).to(tl.int64)[None, :, None]
    offs = (chan + h * stride_h) * VEC + w[None, None, :] * stride_w
    return offs, (rr < CH)[None, :, None] & (w < W)[None, None, :]


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _pool_nested_fwd_kernel(
    x_ptr,                      # [N, C, H, W], NCHW or channels_last
    out_ptr,                    # [N, C, S] contiguous, x's dtype
    cat_ptr,                    # concat [N, >=C, H, W] (written only when COPY)
    tab_ptr, inv_area_ptr,      # nested tables: i32 [L, J_PAD], acc [S]
    C, S, L, CH, CW, W_VEC,     # L: fine grid size; CH x CW: pixels per fine cell; W = W_VEC * VEC
    stride_xn, stride_xc, stride_xh, stride_xw,     # n, c, h strides in units of VEC elements
    stride_cn, stride_cc, stride_ch, stride_cw,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, J_PAD: tl.constexpr,
    VEC: tl.constexpr, COPY: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (channel blocks, N), one program per (n, block of BLOCK_C channels); it streams
    # its [BLOCK_C, H, W] slab of x once, fine row by fine row, in [BLOCK_C, BLOCK_H, BLOCK_W] tiles
    # (BLOCK_H rows of one fine row, all their loads in flight at once; W in BLOCK_W chunks). The rows are
    # summed first (elementwise), then each fine cell (i, j) is the sum of the row sum's columns w with
    # w // CW == j (a selection) and is added to its column cell of every bin: acc [BLOCK_C, J_PAD] holds
    # the open row band of cells of every bin. After the last fine row of a bin's band, that band is
    # scaled by 1/area, stored (every cell once, no epilogue) and reopened. Fixed order, no atomics.
    c_start = tl.program_id(0) * BLOCK_C
    n = tl.program_id(1).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    mask_c = (c_start + cc < C)[:, None, None]
    W = W_VEC * VEC
    out_blk = out_ptr + (n * C + c_start) * S
    # Block base pointers (64-bit scalars) and in-block offsets
    x_blk = x_ptr + (n * stride_xn + c_start.to(tl.int64) * stride_xc) * VEC
    cat_blk = cat_ptr + (n * stride_cn + c_start.to(tl.int64) * stride_cc) * VEC
    x_chan = cc[:, None, None] * stride_xc
    cat_chan = cc[:, None, None] * stride_cc

    acc = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)        # the open row band of cells of every bin
    for i in range(0, L):
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            row_sum = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC_DTYPE)
            for r in range(0, CH, BLOCK_H):
                offs, mask = _row_tile(x_chan, i, r, CH, W, w, stride_xh, stride_xw, VEC, BLOCK_H)
                xt = tl.load(x_blk + offs, mask=mask_c & mask, other=0.0)
                if COPY:
                    offs, mask = _row_tile(cat_chan, i, r, CH, W, w, stride_ch, stride_cw, VEC, BLOCK_H)
                    tl.store(cat_blk + offs, xt, mask=mask_c & mask)
                row_sum += tl.sum(xt.to(ACC_DTYPE), axis=1)
            fine_cols, _, _ = _row_cells(tab_ptr, i, J_PAD)
            for j in range(0, L):
                cell = tl.sum(tl.where((w // CW == j)[None, :], row_sum, 0.0), axis=1)    # fine cell (i, j)
                acc += tl.where((((fine_cols >> j) & 1) != 0)[None, :], cell[:, None], 0.0)
        # cells whose last fine row is i are complete: scale, store (each cell once) and reopen them
        _, last, q = _row_cells(tab_ptr, i, J_PAD)
        val = acc * tl.load(inv_area_ptr + q)[None, :]
        tl.store(out_blk + cc[:, None] * S + q[None, :], val.to(out_ptr.dtype.element_ty),
                 mask=(c_start + cc < C)[:, None] & last[None, :])
        acc = tl.where(last[None, :], 0.0, acc)


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
    # Decomposition: grid (channel blocks, N), one program per (n, block of BLOCK_C channels) (program ids
    # read directly: nothing derived from them is spilled across the loops); it streams its [BLOCK_C, H, W] slab
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
# "small" serves fp32 and fp64 (all their products are IEEE FMA loops: fp32 "main" spills registers) and
# shapes with too few programs to fill an H100 (132 SMs).
POOL_FWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}
POOL_BWD_CONFIGS = {"main": (32, 64, 4), "small": (16, 32, 4)}
MIN_PROGRAMS = 264          # two per SM of an H100 (132 SMs)


def _pool_config(dtype: torch.dtype, programs_main: int, width: int) -> str:
    if dtype in (torch.float32, torch.float64) or programs_main < 132 or width <= 16:
        return "small"
    return "main"


# Nested path tiles [BLOCK_C, BLOCK_H, BLOCK_W] (W in chunks of BLOCK_W), 16 rows: a whole fine row at 60x60
# and 90x90 (CH = 10, 15), so a fine row is one step and all its loads are in flight at once.
# - "nchw" (w contiguous): BLOCK_W = 64 (W <= 64) or 128, 2048 elements at 4 warps; loads are VEC elements
#   wide (VEC = the power of two <= 4 dividing W and the n, c, h strides, see row_vec);
# - "cl" (c contiguous): BLOCK_C channels = 32 bytes per pixel (a DRAM sector), 16 bytes when that leaves
#   fewer than MIN_PROGRAMS programs (N=1), at 8 warps; 4096 elements for 16-bit dtypes, 2048 for fp32 and
#   fp64 (the sizes whose binaries have no register spills at the benchmark shapes).
NESTED_WIDTHS = (64, 128)
ROW_VECS = (1, 2, 4)


def nested_tile(dtype: torch.dtype, channels_last: bool, width: int, n: int, c: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) of the nested kernels for N x C channels of rows ``width`` wide."""
    if not channels_last:
        bw = NESTED_WIDTHS[0] if width <= NESTED_WIDTHS[0] else NESTED_WIDTHS[1]
        return 2048 // (16 * bw), 16, bw, 4
    size = torch.empty((), dtype=dtype).element_size()
    bc = 32 // size if n * triton.cdiv(c, 32 // size) >= MIN_PROGRAMS else 16 // size
    return bc, 16, (4096 if size == 2 else 2048) // (16 * bc), 8


def row_vec(dtype: torch.dtype, width: int, *tensors: torch.Tensor) -> int:
    """VEC of the kernels that address image rows in units of VEC elements (the nested pooling, the upsampling
    backward): the largest power of two <= 4 (and <= 16 bytes) dividing W and every n, c, h stride of
    ``tensors`` when w is their contiguous dim (NCHW), else 1."""
    if any(t.stride(3) != 1 for t in tensors):
        return 1
    vec = min(ROW_VECS[-1], 16 // torch.empty((), dtype=dtype).element_size())
    while vec > 1 and any(v % vec for t in tensors for v in (width, *t.stride()[:3])):
        vec //= 2
    return vec


def vec_strides(t: torch.Tensor | None, vec: int) -> tuple[int, int, int, int]:
    """(n, c, h strides in units of vec, w stride) of t (zeros when None)."""
    if t is None:
        return 0, 0, 0, 0
    sn, sc, sh, sw = t.stride()
    return sn // vec, sc // vec, sh // vec, sw


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
        _, j_pad, row_tab, inv_area = nested_tables(bins, h, w, x.dtype, x.device)
        bc, bh, bw, nw = nested_tile(x.dtype, is_channels_last(x), w, n, c)
        vec = row_vec(x.dtype, w, x, cat)
        assert n < 65536, n
        _pool_nested_fwd_kernel[(triton.cdiv(c, bc), n)](
            x, out, cat, row_tab, inv_area, c, s, big, h // big, w // big, w // vec, *vec_strides(x, vec),
            *vec_strides(concat, vec), BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, J_PAD=j_pad, VEC=vec, COPY=copy,
            ACC_DTYPE=acc_tl(x.dtype), num_warps=nw)
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
    tab_ptr, inv_area_ptr,      # nested tables: i32 [L, J_PAD], acc [S]
    C, S, L, CH, CW, W_VEC, ROWS,   # as the forward; ROWS: fine rows per program
    stride_gn, stride_gc, stride_gh, stride_gw,     # n, c, h strides in units of VEC elements
    stride_rn, stride_rc, stride_rh, stride_rw,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, J_PAD: tl.constexpr,
    VEC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (channel blocks, fine-row blocks, N), one program per (n, block of BLOCK_C
    # channels, block of ROWS fine rows). Per fine row i it gathers g / area of the cells of every bin
    # whose rows hold i ([BLOCK_C, J_PAD], one per column cell); per fine column j the fine-cell gradient
    # D[c, i, j] = sum over those cells containing column j (a selection-sum, fixed order) is selected
    # into the columns w // CW == j of a row, which is written to the fine row's CH image rows in
    # [BLOCK_C, BLOCK_H, BLOCK_W] tiles, plus the residual: every grad_x element is written exactly once.
    # No zero-fill, no atomics.
    c_start = tl.program_id(0) * BLOCK_C
    i_start = tl.program_id(1) * ROWS
    n = tl.program_id(2).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    mask_c = (c_start + cc < C)[:, None, None]
    W = W_VEC * VEC
    g_blk = g_ptr + (n * C + c_start) * S
    # Block base pointers (64-bit scalars) and in-block offsets
    gx_blk = gx_ptr + (n * stride_gn + c_start.to(tl.int64) * stride_gc) * VEC
    res_blk = res_ptr + (n * stride_rn + c_start.to(tl.int64) * stride_rc) * VEC
    gx_chan = cc[:, None, None] * stride_gc
    res_chan = cc[:, None, None] * stride_rc
    for i in range(i_start, tl.minimum(i_start + ROWS, L)):
        fine_cols, _, q = _row_cells(tab_ptr, i, J_PAD)
        g = tl.load(g_blk + cc[:, None] * S + q[None, :], mask=(c_start + cc < C)[:, None], other=0.0)
        g = g.to(ACC_DTYPE) * tl.load(inv_area_ptr + q)[None, :]                             # [BLOCK_C, J_PAD]
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            val_row = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC_DTYPE)
            for j in range(0, L):
                d = tl.sum(tl.where((((fine_cols >> j) & 1) != 0)[None, :], g, 0.0), axis=1)   # D[c, i, j]
                val_row = tl.where((w // CW == j)[None, :], d[:, None], val_row)
            for r in range(0, CH, BLOCK_H):
                offs, mask = _row_tile(gx_chan, i, r, CH, W, w, stride_gh, stride_gw, VEC, BLOCK_H)
                val = tl.broadcast_to(val_row[:, None, :], [BLOCK_C, BLOCK_H, BLOCK_W])
                if HAS_RESIDUAL:
                    offs_r, mask_r = _row_tile(res_chan, i, r, CH, W, w, stride_rh, stride_rw, VEC, BLOCK_H)
                    val += tl.load(res_blk + offs_r, mask=mask_c & mask_r, other=0.0).to(ACC_DTYPE)
                tl.store(gx_blk + offs, val.to(gx_ptr.dtype.element_ty), mask=mask_c & mask)


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
    """Split the rows (image rows, or fine rows in the nested path) so that there are enough programs (>= 4
    per SM of an H100) while each still reuses its slice of g for several rows."""
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
        s, j_pad, row_tab, inv_area = nested_tables(bins, height, width, grad_pooled.dtype, grad_pooled.device)
        bc, bh, bw, nw = nested_tile(grad_pooled.dtype, channels_last, width, n, c)
        vec = row_vec(grad_pooled.dtype, width, gx, res)
        rows = _rows_per_program(n * triton.cdiv(c, bc), big)
        assert n < 65536, n
        _pool_nested_bwd_kernel[(triton.cdiv(c, bc), triton.cdiv(big, rows), n)](
            grad_pooled, gx, res, row_tab, inv_area, c, s, big, height // big, width // big, width // vec, rows,
            *vec_strides(gx, vec), *vec_strides(residual, vec), BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw,
            J_PAD=j_pad, VEC=vec, HAS_RESIDUAL=has_res, ACC_DTYPE=acc, num_warps=nw)
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


def _nested_tiles(dtype: torch.dtype):
    """Every (layout, (BLOCK_C, BLOCK_H, BLOCK_W, num_warps), VEC) the nested launchers can pick for ``dtype``
    (NCHW: each chunk width and VEC; channels_last: many programs ... one image of 2048 channels)."""
    vecs = [v for v in ROW_VECS if v * torch.empty((), dtype=dtype).element_size() <= 16]
    out = [("nchw", nested_tile(dtype, False, bw, 1, 1), v) for bw in NESTED_WIDTHS for v in vecs]
    return out + [("cl", tile, 1) for tile in sorted({nested_tile(dtype, True, 64, n, 2048) for n in (1 << 20, 1)})]


def _nested_configs(dtype: torch.dtype, dt: str, acc: str):
    out = []
    for layout, (bc, bh, bw, nw), vec in _nested_tiles(dtype):
        tile = dict(BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, J_PAD=16, VEC=vec, ACC_DTYPE=acc_tl(dtype))
        name = f"{dt}/{layout}/w{bw}/c{bc}/v{vec}"
        for flag in (False, True):
            out.append((_pool_nested_fwd_kernel, CompileConfig(
                f"pool_nested_fwd/{name}/{'copy' if flag else 'pool'}",
                _signature({"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cat_ptr": f"*{dt}", "tab_ptr": "*i32",
                            "inv_area_ptr": f"*{acc}"}, ("C", "S", "L", "CH", "CW", "W_VEC") + _X_STRIDES,
                           (*tile, "COPY")),
                dict(tile, COPY=flag), num_warps=nw)))
            out.append((_pool_nested_bwd_kernel, CompileConfig(
                f"pool_nested_bwd/{name}/{'add' if flag else 'plain'}",
                _signature({"g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "res_ptr": f"*{dt}", "tab_ptr": "*i32",
                            "inv_area_ptr": f"*{acc}"}, ("C", "S", "L", "CH", "CW", "W_VEC", "ROWS") + _G_STRIDES,
                           (*tile, "HAS_RESIDUAL")),
                dict(tile, HAS_RESIDUAL=flag), num_warps=nw)))
    return out


# (S_PAD, J_PAD): default bins (1, 2, 3, 6) -> (64, 16); larger pyramids, e.g. (1, 2, 3, 6, 8) -> (128, 32),
# are registered for the "main" config (the largest tiles, hence the most shared memory).
_PADS = {"main": ((64, 16), (128, 32)), "small": ((64, 16),)}


def launcher_configs(dtype: torch.dtype) -> tuple[str, ...]:
    """General-path config names the launchers can pick for ``dtype`` (fp32 and fp64 always run "small")."""
    return ("small",) if dtype in (torch.float32, torch.float64) else ("main", "small")


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        out += _general_configs(dtype, dt, acc) + _nested_configs(dtype, dt, acc)
    return out
