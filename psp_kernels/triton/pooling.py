"""Triton kernels of the multi-bin adaptive average pool (``psp::multibin_avg_pool`` and its backward).

Both directions use the *separable* form of adaptive pooling. For packed cell ``q`` (bin ``k``, row
cell ``i``, column cell ``j``, see :mod:`psp_kernels.geometry`):

    pooled[n, c, q] = inv_area[q] * sum_h [h in rowwin(q)] * sum_w [w in colwin(j_q)] * x[n, c, h, w]

Windows are exactly ``nn.AdaptiveAvgPool2d``'s (``geometry.window``): they may overlap and, when the map
is smaller than the bin, repeat rows/columns. Both paths below stream x (or write grad_x) once, in
[channels, 16 rows, W chunk] tiles (all of a tile's loads in flight at once, VEC-wide along w in NCHW),
and use only exact selections (``tl.where``) and sums: a non-finite input stays in the cells that contain
it, a non-finite gradient in the pixels of its cell.

Nested path. When every bin divides the largest bin L and L divides H and W (semseg's bins 1/2/3/6 at
60x60 or 90x90, the 473 and 713 crops), the windows nest: x is summed once into the L x L *fine cells*
(``H/L x W/L`` pixels each) and every coarser cell is the sum of the fine cells it covers
(docs/ppm_byte_model.md). The forward sums each fine row's image rows elementwise, then cuts the row sum
into fine cells (``w // (W/L)``) and adds each to its column cell of every bin: the accumulator holds one
open row band of cells per bin ([channels, J], ``J = sum(bins)`` column cells), stored (times 1/area)
after the band's last fine row. The backward gathers, per fine row, g / area of the cells holding that
row, forms the fine-cell gradient ``D = sum_b g_b[parent_b] / area_b`` of each fine column and broadcasts
it over the fine row's pixels.

General path (any H, W, bins). The boundaries of all row windows cut [0, H) into E *elementary row
segments* (at most 2 * sum(bins)); every row window is a union of whole segments. The forward sums each
segment's rows elementwise, then for every column cell ``jc`` (the J column windows of all bins) sums the
segment's columns in its window and adds that to the cells of column jc whose row windows hold the segment
(acc [channels, S] holds every cell, as windows may overlap or repeat; each cell takes its column cell's
sum with ``tl.gather``). The backward is the transpose: per segment and column cell, the sum of g / area
over the cells of that column holding the segment (gathered through a small -1-padded table), added to the
window's columns of one row, written to the segment's rows.

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
from .common import SIG_DTYPE, CompileConfig, acc_tl, pow2

# --------------------------------------------------------------------------------------------------
# Bin tables
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _pool_tables_host(bins: tuple[int, ...], height: int, width: int):
    """Host-side tables of the general path (see :func:`pool_tables`) as lists."""
    s, j = packed_size(bins), sum(bins)
    s_pad, j_pad = max(64, pow2(s)), max(16, pow2(j))   # at least the registered sizes (bins 1/2/3/6: 50, 12)
    cell = [[0] * s_pad for _ in range(3)]          # rs, re, column cell (padding: empty row window)
    col = [[0] * j_pad for _ in range(2)]           # cs, ce (padding: empty column window)
    inv_area = [0.0] * s_pad
    col_off = 0
    for b, off in zip(bins, bin_offsets(bins)):
        for jj in range(b):
            col[0][col_off + jj], col[1][col_off + jj] = window(jj, b, width)
            for i in range(b):
                q = off + i * b + jj
                rs, re = window(i, b, height)
                cell[0][q], cell[1][q], cell[2][q] = rs, re, col_off + jj
                inv_area[q] = 1.0 / ((re - rs) * (col[1][col_off + jj] - col[0][col_off + jj]))
        col_off += b
    bounds = sorted({0, height} | set(cell[0][:s]) | set(cell[1][:s]))
    segments = list(zip(bounds, bounds[1:]))
    holding = [[[q for q in range(s) if cell[2][q] == jc and cell[0][q] <= r0 and r1 <= cell[1][q]]
                for jc in range(j)] for r0, r1 in segments]
    depth = max(len(qs) for seg in holding for qs in seg)
    seg_cells = [[[seg[jc][k] if jc < j and k < len(seg[jc]) else -1 for jc in range(j_pad)] for k in range(depth)]
                 for seg in holding]
    return s, s_pad, j_pad, [[r0, r1 - r0] for r0, r1 in segments], depth, seg_cells, cell, col, inv_area


def pool_tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """Device tables of the general path for (bins, H, W), cached per device: ``(S, S_PAD, J_PAD, E, K,
    segments [E, 2], seg_cells [E, K, J_PAD], cells [3, S_PAD], columns [2, J_PAD], inv_area [S_PAD])``, int32
    but inv_area (acc dtype). The boundaries of all row windows cut [0, H) into E elementary row segments (first
    row, row count); every row window is a union of whole segments. Per segment and column cell, seg_cells
    lists the packed cells of that column whose row windows hold the segment (at most K, padded with -1);
    cells: per packed cell its row window [rs, re) and column cell; columns: per column cell its window [cs,
    ce). Padded cells and columns have empty windows."""
    def make():
        s, s_pad, j_pad, segments, depth, seg_cells, cell, col, inv_area = _pool_tables_host(tuple(bins), height,
                                                                                            width)
        i32 = dict(dtype=torch.int32, device=device)
        return (s, s_pad, j_pad, len(segments), depth, torch.tensor(segments, **i32), torch.tensor(seg_cells, **i32),
                torch.tensor(cell, **i32), torch.tensor(col, **i32),
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
        inv_area = _pool_tables_host(tuple(bins), height, width)[-1]
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
def _row_tile(chan, row0, r, rows, W, w, stride_h, stride_w, VEC: tl.constexpr, BLOCK_H: tl.constexpr):
    """Offsets and row/column mask of the [BLOCK_C, BLOCK_H, BLOCK_W] tile holding rows ``row0 + r + [0,
    BLOCK_H)`` of the ``rows`` rows from ``row0`` (a fine row, or an elementary row segment) and columns ``w``
    of the channels at ``chan`` ([BLOCK_C, 1, 1], like ``stride_h`` in units of VEC elements: a multiple of VEC
    is a VEC-aligned row start)."""
    rr = r + tl.arange(0, BLOCK_H)
    h = (row0 + rr).to(tl.int64)[None, :, None]
    offs = (chan + h * stride_h) * VEC + w[None, None, :] * stride_w
    return offs, (rr < rows)[None, :, None] & (w < W)[None, None, :]


@triton.jit
def _column_windows(col_ptr, w, J_PAD: tl.constexpr):
    """[J_PAD, BLOCK_W] mask: column w lies in column cell jc's window (general path tables)."""
    jj = tl.arange(0, J_PAD)
    cs = tl.load(col_ptr + jj)
    ce = tl.load(col_ptr + J_PAD + jj)
    return (w[None, :] >= cs[:, None]) & (w[None, :] < ce[:, None])


@triton.jit
def _block_ptrs(ptr, n, c_start, cc, stride_n, stride_c, VEC: tl.constexpr):
    """Base pointer of image n's channel block at c_start (a 64-bit scalar) and the in-block channel offsets
    ``cc * stride_c`` ([BLOCK_C, 1, 1]); strides in units of VEC elements."""
    return ptr + (n * stride_n + c_start.to(tl.int64) * stride_c) * VEC, cc[:, None, None] * stride_c


@triton.jit
def _slab(a_ptr, stride_an, stride_ac, b_ptr, stride_bn, stride_bc, C, W_VEC, N_AXIS: tl.constexpr,
          BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Prologue of the pooling kernels: the program's first channel, image n (program axis N_AXIS), channel
    offsets and mask, W, and the block pointers / in-block channel offsets of its two image-sized tensors."""
    c_start = tl.program_id(0) * BLOCK_C
    n = tl.program_id(N_AXIS).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    a_blk, a_chan = _block_ptrs(a_ptr, n, c_start, cc, stride_an, stride_ac, VEC)
    b_blk, b_chan = _block_ptrs(b_ptr, n, c_start, cc, stride_bn, stride_bc, VEC)
    return c_start, n, cc, (c_start + cc < C)[:, None, None], W_VEC * VEC, a_blk, a_chan, b_blk, b_chan


@triton.jit
def _sum_band(x_blk, x_chan, cat_blk, cat_chan, mask_c, row0, rows, W, w, stride_xh, stride_xw, stride_ch, stride_cw,
              BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, VEC: tl.constexpr,
              COPY: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """[BLOCK_C, BLOCK_W] sum of the ``rows`` image rows from ``row0`` at columns w, streamed as [BLOCK_C,
    BLOCK_H, BLOCK_W] tiles (all of a tile's loads in flight at once); when COPY, each tile is also written to
    the concat buffer."""
    band = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC_DTYPE)
    for r in range(0, rows, BLOCK_H):
        offs, mask = _row_tile(x_chan, row0, r, rows, W, w, stride_xh, stride_xw, VEC, BLOCK_H)
        xt = tl.load(x_blk + offs, mask=mask_c & mask, other=0.0)
        if COPY:
            offs, mask = _row_tile(cat_chan, row0, r, rows, W, w, stride_ch, stride_cw, VEC, BLOCK_H)
            tl.store(cat_blk + offs, xt, mask=mask_c & mask)
        band += tl.sum(xt.to(ACC_DTYPE), axis=1)
    return band


@triton.jit
def _store_band(gx_blk, gx_chan, res_blk, res_chan, mask_c, row0, rows, W, w, val_row, stride_gh, stride_gw,
                stride_rh, stride_rw, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                VEC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Write ``val_row`` [BLOCK_C, BLOCK_W] (plus the residual when HAS_RESIDUAL, summed in ACC_DTYPE and
    rounded once) to the ``rows`` image rows from ``row0`` at columns w, in [BLOCK_C, BLOCK_H, BLOCK_W] tiles."""
    for r in range(0, rows, BLOCK_H):
        offs, mask = _row_tile(gx_chan, row0, r, rows, W, w, stride_gh, stride_gw, VEC, BLOCK_H)
        val = tl.broadcast_to(val_row[:, None, :], [BLOCK_C, BLOCK_H, BLOCK_W])
        if HAS_RESIDUAL:
            offs_r, mask_r = _row_tile(res_chan, row0, r, rows, W, w, stride_rh, stride_rw, VEC, BLOCK_H)
            val += tl.load(res_blk + offs_r, mask=mask_c & mask_r, other=0.0).to(ACC_DTYPE)
        tl.store(gx_blk + offs, val.to(gx_blk.dtype.element_ty), mask=mask_c & mask)


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
    c_start, n, cc, mask_c, W, x_blk, x_chan, cat_blk, cat_chan = _slab(
        x_ptr, stride_xn, stride_xc, cat_ptr, stride_cn, stride_cc, C, W_VEC, 1, BLOCK_C, VEC)
    out_blk = out_ptr + (n * C + c_start) * S

    acc = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)        # the open row band of cells of every bin
    for i in range(0, L):
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            row_sum = _sum_band(x_blk, x_chan, cat_blk, cat_chan, mask_c, i * CH, CH, W, w, stride_xh, stride_xw,
                                stride_ch, stride_cw, BLOCK_C, BLOCK_H, BLOCK_W, VEC, COPY, ACC_DTYPE)
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
    x_ptr,                      # [N, C, H, W], NCHW or channels_last
    out_ptr,                    # [N, C, S] contiguous, x's dtype
    cat_ptr,                    # concat [N, >=C, H, W] (written only when COPY)
    seg_ptr,                    # i32 [E, 2]: first row and row count of each elementary row segment
    cell_ptr,                   # i32 [3, S_PAD]: row-window start, end, column cell of each packed cell
    col_ptr,                    # i32 [2, J_PAD]: column-window start, end of each column cell
    inv_area_ptr,               # acc [S_PAD]: 1 / window area (0 for padding)
    C, S, E, W_VEC,             # W = W_VEC * VEC
    stride_xn, stride_xc, stride_xh, stride_xw,     # n, c, h strides in units of VEC elements
    stride_cn, stride_cc, stride_ch, stride_cw,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, S_PAD: tl.constexpr,
    J_PAD: tl.constexpr, VEC: tl.constexpr, COPY: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (channel blocks, N), one program per (n, block of BLOCK_C channels); it streams its
    # [BLOCK_C, H, W] slab of x once, row segment by segment, in the nested path's tiles. Per segment the rows
    # are summed elementwise (per W chunk), each column cell's window sum of that row sum is selected out
    # ([BLOCK_C, J_PAD]), and every cell whose row window holds the segment gathers its column cell's sum:
    # acc [BLOCK_C, S_PAD] holds every cell (windows may overlap or repeat). Fixed order, no atomics.
    c_start, n, cc, mask_c, W, x_blk, x_chan, cat_blk, cat_chan = _slab(
        x_ptr, stride_xn, stride_xc, cat_ptr, stride_cn, stride_cc, C, W_VEC, 1, BLOCK_C, VEC)
    q = tl.arange(0, S_PAD)
    col_of_cell = tl.broadcast_to(tl.load(cell_ptr + 2 * S_PAD + q)[None, :], [BLOCK_C, S_PAD])

    acc = tl.zeros([BLOCK_C, S_PAD], dtype=ACC_DTYPE)
    for e in range(0, E):
        r0 = tl.load(seg_ptr + 2 * e)
        rows = tl.load(seg_ptr + 2 * e + 1)
        part = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)                  # column-cell sums of the segment
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            band = _sum_band(x_blk, x_chan, cat_blk, cat_chan, mask_c, r0, rows, W, w, stride_xh, stride_xw,
                             stride_ch, stride_cw, BLOCK_C, BLOCK_H, BLOCK_W, VEC, COPY, ACC_DTYPE)
            in_window = _column_windows(col_ptr, w, J_PAD)
            part += tl.sum(tl.where(in_window[None, :, :], band[:, None, :], 0.0), axis=2)
        holds = (tl.load(cell_ptr + q) <= r0) & (r0 + rows <= tl.load(cell_ptr + S_PAD + q))
        acc += tl.where(holds[None, :], tl.gather(part, col_of_cell, axis=1), 0.0)

    acc = acc * tl.load(inv_area_ptr + q)[None, :]
    out_blk = out_ptr + (n * C + c_start) * S
    tl.store(out_blk + cc[:, None] * S + q[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(c_start + cc < C)[:, None] & (q < S)[None, :])


MIN_PROGRAMS = 264          # two per SM of an H100 (132 SMs)
PATHS = ("nested", "general")
GENERAL_VEC_CELLS = 64      # the general path reads rows VEC wide for pyramids of up to 64 cells (bins 1/2/3/6: 50)
# The general path's register cap (ptxas ``.maxnreg``): 128 keeps >= 25 % occupancy at 4 and 8 warps by
# construction, and with an explicit cap ptxas allocates what the kernel needs instead of trading a few bytes
# of spill for occupancy (uncapped, 7 of the 88 launch specialisations at 61x61 / 45x60 spilled 8-16 B, one
# took 159 registers: bench/gpu_resources.py).
GENERAL_MAXNREG = 128


# Tiles [BLOCK_C, BLOCK_H, BLOCK_W] of both paths (W in chunks of BLOCK_W), 16 rows: a whole fine row at
# 60x60 and 90x90 (CH = 10, 15), or a whole row segment of the general path (at most ceil(H / max(bins)) + 1
# rows: 12 at 61x61), so each is one step and all its loads are in flight at once.
# - "nchw" (w contiguous): BLOCK_W = 64 (W <= 64) or 128, 2048 elements at 4 warps; loads are VEC elements
#   wide (VEC = the power of two <= 4 dividing W and the n, c, h strides, see row_vec);
# - "cl" (c contiguous): BLOCK_C channels = 32 bytes per pixel (a DRAM sector), 16 bytes when that leaves
#   fewer than MIN_PROGRAMS programs (N=1), at 8 warps; 4096 elements for 16-bit dtypes, 2048 for fp32 and
#   fp64 (the sizes whose binaries have no register spills at the benchmark shapes).
NESTED_WIDTHS = (64, 128)
ROW_VECS = (1, 2, 4)


def pool_tile(dtype: torch.dtype, channels_last: bool, width: int, n: int, c: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) of the pooling kernels for N x C channels of rows ``width`` wide."""
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


def _path(config: str | None, bins: Sequence[int], height: int, width: int) -> int | None:
    """L of the nested path when it runs (the default where the windows nest), None for the general path."""
    if config is not None and config not in PATHS:
        raise ValueError(f"config must be one of {PATHS} or None, got {config!r}")
    return nested_level(bins, height, width) if config != "general" else None


def _general_vec(s_pad: int, dtype: torch.dtype, width: int, *tensors: torch.Tensor) -> int:
    return row_vec(dtype, width, *tensors) if s_pad <= GENERAL_VEC_CELLS else 1


def _pool_forward(x: torch.Tensor, bins: Sequence[int], concat: torch.Tensor | None, config: str | None):
    n, c, h, w = x.shape
    s = packed_size(bins)
    out = torch.empty(n, c, s, dtype=x.dtype, device=x.device)
    big = _path(config, bins, h, w)
    if out.numel() == 0:
        return out
    copy, cat = concat is not None, (concat if concat is not None else x)
    bc, bh, bw, nw = pool_tile(x.dtype, is_channels_last(x), w, n, c)
    tile = dict(BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, COPY=copy, ACC_DTYPE=acc_tl(x.dtype), num_warps=nw)
    assert n < 65536, n
    if big is not None:
        _, j_pad, row_tab, inv_area = nested_tables(bins, h, w, x.dtype, x.device)
        vec = row_vec(x.dtype, w, x, cat)
        _pool_nested_fwd_kernel[(triton.cdiv(c, bc), n)](
            x, out, cat, row_tab, inv_area, c, s, big, h // big, w // big, w // vec, *vec_strides(x, vec),
            *vec_strides(concat, vec), J_PAD=j_pad, VEC=vec, **tile)
        return out
    s, s_pad, j_pad, segments, _, seg_tab, _, cell_tab, col_tab, inv_area = pool_tables(bins, h, w, x.dtype,
                                                                                        x.device)
    vec = _general_vec(s_pad, x.dtype, w, x, cat)
    _pool_fwd_kernel[(triton.cdiv(c, bc), n)](
        x, out, cat, seg_tab, cell_tab, col_tab, inv_area, c, s, segments, w // vec, *vec_strides(x, vec),
        *vec_strides(concat, vec), S_PAD=s_pad, J_PAD=j_pad, VEC=vec, maxnreg=GENERAL_MAXNREG, **tile)
    return out


def multibin_avg_pool(x: torch.Tensor, bins: Sequence[int], *, config: str | None = None) -> torch.Tensor:
    """Adaptive average pooling of ``x`` to every bin in one pass over x.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last (read in place).
        bins: bin sizes, in packed order.
        config: ``"general"`` forces the general path (tests, tuning); ``None`` or ``"nested"``: the nested
            path where the windows nest, else the general path.
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
    c_start, n, cc, mask_c, W, gx_blk, gx_chan, res_blk, res_chan = _slab(
        gx_ptr, stride_gn, stride_gc, res_ptr, stride_rn, stride_rc, C, W_VEC, 2, BLOCK_C, VEC)
    i_start = tl.program_id(1) * ROWS
    g_blk = g_ptr + (n * C + c_start) * S
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
            _store_band(gx_blk, gx_chan, res_blk, res_chan, mask_c, i * CH, CH, W, w, val_row, stride_gh, stride_gw,
                        stride_rh, stride_rw, BLOCK_C, BLOCK_H, BLOCK_W, VEC, HAS_RESIDUAL, ACC_DTYPE)


@triton.jit
def _pool_bwd_kernel(
    g_ptr,                      # [N, C, S] contiguous (grad of pooled)
    gx_ptr,                     # [N, C, H, W] output, NCHW or channels_last strides
    res_ptr,                    # residual [N, C, H, W] view (read only when HAS_RESIDUAL)
    seg_ptr,                    # i32 [E, 2]: as in _pool_fwd_kernel
    seg_cells_ptr,              # i32 [E, K, J_PAD]: per segment and column cell, the cells holding the segment
    col_ptr, inv_area_ptr,      # as in _pool_fwd_kernel
    C, S, E, K, W_VEC, SEGS,    # as the forward; K: cells per (segment, column cell) at most; SEGS per program
    stride_gn, stride_gc, stride_gh, stride_gw,     # n, c, h strides in units of VEC elements
    stride_rn, stride_rc, stride_rh, stride_rw,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, S_PAD: tl.constexpr,
    J_PAD: tl.constexpr, VEC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (channel blocks, segment blocks, N), one program per (n, block of BLOCK_C channels,
    # SEGS row segments). It loads its [BLOCK_C, S] slice of g once (times 1/area); per segment, every column
    # cell gathers the sum of g / area over its cells whose row windows hold the segment ([BLOCK_C, J_PAD]),
    # each column sums the column cells whose windows contain it (a selection-sum), and that row is written
    # to the segment's rows (plus the residual): every grad_x element is written exactly once, a fixed-order
    # sum over the cells containing it.
    c_start, n, cc, mask_c, W, gx_blk, gx_chan, res_blk, res_chan = _slab(
        gx_ptr, stride_gn, stride_gc, res_ptr, stride_rn, stride_rc, C, W_VEC, 2, BLOCK_C, VEC)
    e_start = tl.program_id(1) * SEGS
    q = tl.arange(0, S_PAD)
    jj = tl.arange(0, J_PAD)
    g = tl.load(g_ptr + (n * C + c_start) * S + cc[:, None] * S + q[None, :],
                mask=(c_start + cc < C)[:, None] & (q < S)[None, :], other=0.0)
    g = g.to(ACC_DTYPE) * tl.load(inv_area_ptr + q)[None, :]                                # [BLOCK_C, S_PAD]
    for e in range(e_start, tl.minimum(e_start + SEGS, E)):
        r0 = tl.load(seg_ptr + 2 * e)
        rows = tl.load(seg_ptr + 2 * e + 1)
        t = tl.zeros([BLOCK_C, J_PAD], dtype=ACC_DTYPE)                     # per column cell
        for k in range(0, K):
            cell = tl.load(seg_cells_ptr + (e * K + k) * J_PAD + jj)
            picked = tl.gather(g, tl.broadcast_to(tl.maximum(cell, 0)[None, :], [BLOCK_C, J_PAD]), axis=1)
            t += tl.where((cell >= 0)[None, :], picked, 0.0)
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            in_window = _column_windows(col_ptr, w, J_PAD)
            val_row = tl.sum(tl.where(in_window[None, :, :], t[:, :, None], 0.0), axis=1)     # [BLOCK_C, BLOCK_W]
            _store_band(gx_blk, gx_chan, res_blk, res_chan, mask_c, r0, rows, W, w, val_row, stride_gh, stride_gw,
                        stride_rh, stride_rw, BLOCK_C, BLOCK_H, BLOCK_W, VEC, HAS_RESIDUAL, ACC_DTYPE)


def _rows_per_program(programs: int, height: int) -> int:
    """Split the rows (fine rows of the nested path, row segments of the general one) so that there are enough
    programs (>= 4 per SM of an H100) while each still reuses its slice of g for several rows."""
    return height if programs >= 528 else max(1, height // triton.cdiv(528, programs))


def _pool_backward(grad_pooled, bins, height, width, channels_last, residual, config):
    n, c, s_in = grad_pooled.shape
    assert grad_pooled.is_contiguous() and s_in == packed_size(bins), (grad_pooled.shape, bins)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype, device = grad_pooled.dtype, grad_pooled.device
    gx = torch.empty(n, c, height, width, dtype=dtype, device=device, memory_format=fmt)
    big = _path(config, bins, height, width)
    if gx.numel() == 0:
        return gx
    has_res, res = residual is not None, (residual if residual is not None else gx)
    bc, bh, bw, nw = pool_tile(dtype, channels_last, width, n, c)
    tile = dict(BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, HAS_RESIDUAL=has_res, ACC_DTYPE=acc_tl(dtype), num_warps=nw)
    assert n < 65536, n
    if big is not None:
        s, j_pad, row_tab, inv_area = nested_tables(bins, height, width, dtype, device)
        vec = row_vec(dtype, width, gx, res)
        rows = _rows_per_program(n * triton.cdiv(c, bc), big)
        _pool_nested_bwd_kernel[(triton.cdiv(c, bc), triton.cdiv(big, rows), n)](
            grad_pooled, gx, res, row_tab, inv_area, c, s, big, height // big, width // big, width // vec, rows,
            *vec_strides(gx, vec), *vec_strides(residual, vec), J_PAD=j_pad, VEC=vec, **tile)
        return gx
    s, s_pad, j_pad, segments, depth, seg_tab, seg_cells, _, col_tab, inv_area = pool_tables(bins, height, width,
                                                                                             dtype, device)
    vec = _general_vec(s_pad, dtype, width, gx, res)
    per_program = _rows_per_program(n * triton.cdiv(c, bc), segments)
    _pool_bwd_kernel[(triton.cdiv(c, bc), triton.cdiv(segments, per_program), n)](
        grad_pooled, gx, res, seg_tab, seg_cells, col_tab, inv_area, c, s, segments, depth, width // vec,
        per_program, *vec_strides(gx, vec), *vec_strides(residual, vec), S_PAD=s_pad, J_PAD=j_pad, VEC=vec,
        maxnreg=GENERAL_MAXNREG, **tile)
    return gx


def multibin_avg_pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                               channels_last: bool, *, config: str | None = None) -> torch.Tensor:
    """Gradient of :func:`multibin_avg_pool` (gather formulation, deterministic, no atomics).

    Args:
        grad_pooled: [N, C, S] contiguous, fp16/bf16/fp32/fp64.
        bins, height, width: the forward's bins and x's spatial size.
        channels_last: return grad_x in channels_last instead of NCHW.
        config: as :func:`multibin_avg_pool`.
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


def _pool_tiles(dtype: torch.dtype):
    """Every (layout, (BLOCK_C, BLOCK_H, BLOCK_W, num_warps), VEC) the launchers can pick for ``dtype`` (NCHW:
    each chunk width and VEC; channels_last: many programs ... one image of 2048 channels)."""
    vecs = [v for v in ROW_VECS if v * torch.empty((), dtype=dtype).element_size() <= 16]
    out = [("nchw", pool_tile(dtype, False, bw, 1, 1), v) for bw in NESTED_WIDTHS for v in vecs]
    return out + [("cl", tile, 1) for tile in sorted({pool_tile(dtype, True, 64, n, 2048) for n in (1 << 20, 1)})]


# Per path: (kernel, table pointers, ints) of the forward and the backward; the general path is registered
# for pyramids of up to 64 cells (bins 1/2/3/6) at every tile and up to 128 cells (e.g. 1/2/3/6/8) at VEC = 1,
# the nested one for up to 16 column cells.
_PATH_KERNELS = {
    "nested": ((_pool_nested_fwd_kernel, {"tab_ptr": "*i32"}, ("C", "S", "L", "CH", "CW", "W_VEC")),
               (_pool_nested_bwd_kernel, {"tab_ptr": "*i32"}, ("C", "S", "L", "CH", "CW", "W_VEC", "ROWS"))),
    "general": ((_pool_fwd_kernel, {"seg_ptr": "*i32", "cell_ptr": "*i32", "col_ptr": "*i32"},
                 ("C", "S", "E", "W_VEC")),
                (_pool_bwd_kernel, {"seg_ptr": "*i32", "seg_cells_ptr": "*i32", "col_ptr": "*i32"},
                 ("C", "S", "E", "K", "W_VEC", "SEGS"))),
}


def _table_pads(path: str, vec: int):
    if path == "nested":
        return [dict(J_PAD=16)]
    return [dict(S_PAD=64, J_PAD=16)] + ([dict(S_PAD=128, J_PAD=32)] if vec == 1 else [])


def _path_configs(path: str, dtype: torch.dtype, dt: str, acc: str):
    (fwd, fwd_tabs, fwd_ints), (bwd, bwd_tabs, bwd_ints) = _PATH_KERNELS[path]
    prefix = "pool_nested" if path == "nested" else "pool"
    options = {} if path == "nested" else dict(maxnreg=GENERAL_MAXNREG)
    out = []
    for layout, (bc, bh, bw, nw), vec in _pool_tiles(dtype):
        for pad in _table_pads(path, vec):
            tile = dict(BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, VEC=vec, ACC_DTYPE=acc_tl(dtype), **pad)
            name = f"{dt}/{layout}/w{bw}/c{bc}/v{vec}" + (f"/s{pad['S_PAD']}" if "S_PAD" in pad else "")
            for flag in (False, True):
                out.append((fwd, CompileConfig(
                    f"{prefix}_fwd/{name}/{'copy' if flag else 'pool'}",
                    _signature({"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cat_ptr": f"*{dt}", **fwd_tabs,
                                "inv_area_ptr": f"*{acc}"}, fwd_ints + _X_STRIDES, (*tile, "COPY")),
                    dict(tile, COPY=flag), num_warps=nw, options=options)))
                out.append((bwd, CompileConfig(
                    f"{prefix}_bwd/{name}/{'add' if flag else 'plain'}",
                    _signature({"g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "res_ptr": f"*{dt}", **bwd_tabs,
                                "inv_area_ptr": f"*{acc}"}, bwd_ints + _G_STRIDES,
                               (*tile, "HAS_RESIDUAL")),
                    dict(tile, HAS_RESIDUAL=flag), num_warps=nw, options=options)))
    return out


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    return [item for dtype in dtypes for path in PATHS
            for item in _path_configs(path, dtype, SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)])]
