"""Triton kernels of the bilinear upsampling + concat (``psp::upsample_concat`` and its backward).

Bilinear, align_corners=True, as ATen: for output row h of a bin of size b, ``src = h * (b-1)/(H-1)``
(0 when H == 1), ``h0 = floor(src)``, ``h1 = min(h0 + 1, b - 1)``, ``lambda = src - h0``; the same for w.
The scales ``(b-1)/(H-1)`` and ``(b-1)/(W-1)`` come from a per-bin table in the accumulation dtype.

The concat buffer [N, C + nb*R, H, W] has channels x, then bin 0's R channels, bin 1's, ... (semseg
order). Both NCHW and channels_last satisfy ``stride(h) == W * stride(w)``, so kernels address a pixel by
its flattened index ``hw`` times one stride; tiles are [channels, hw] and coalesce along whichever of the
two has stride 1.

Backward: the transposed interpolation as a gather in the C++ kernels' order (each gradient row spread
onto its two source rows, rows ascending, then reduced along w onto the b cells, w ascending), with
selections instead of tap-matrix products, so an inf/nan in grad_out reaches exactly the cells whose
taps read it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets, is_channels_last
from ..table_cache import cached_table
from .common import CompileConfig, SIG_DTYPE, acc_tl, bin_channel_block, flat_hw_stride, pow2
from .pooling import ROW_VECS, row_vec, vec_strides

def _tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """(i32 [2, nb] = sizes, packed offsets; acc [2, nb] = scale_h, scale_w; i32 [nb, max(bins) + 1] = per bin
    the first image row of each source-row band i (the rows whose first tap i0 is i, exactly as ``_taps``
    computes it: the same product in the acc dtype, truncated), then H), cached per device."""
    dt = acc_dtype(dtype)

    def make():
        ints = torch.tensor([list(bins), list(bin_offsets(bins))], dtype=torch.int32, device=device)
        # Same expression as ATen's area_pixel_compute_scale(align_corners=True), in the acc dtype.
        sh = [torch.tensor(b - 1, dtype=dt) / (height - 1) if height > 1 else torch.tensor(0.0, dtype=dt)
              for b in bins]
        sw = [torch.tensor(b - 1, dtype=dt) / (width - 1) if width > 1 else torch.tensor(0.0, dtype=dt)
              for b in bins]
        starts = []
        for b, scale in zip(bins, sh):
            i0 = torch.clamp((torch.arange(height, dtype=dt) * scale).to(torch.int64), max=b - 1)
            starts.append([int((i0 < i).sum()) for i in range(b)] + [height] * (max(bins) + 1 - b))
        return (ints, torch.stack([torch.stack(sh), torch.stack(sw)]).to(device),
                torch.tensor(starts, dtype=torch.int32, device=device))
    return cached_table(("upsample", tuple(bins), height, width, dt, str(device)), make)


@triton.jit
def _taps(idx, scale, b, ACC_DTYPE: tl.constexpr):
    """1-D bilinear taps (align_corners=True) of output indices ``idx`` for an input of size ``b``."""
    src = idx * scale                                  # int index * acc-dtype scale -> acc dtype
    i0 = tl.minimum(src.to(tl.int32), b - 1)          # src >= 0: truncation == floor
    i1 = tl.where(i0 < b - 1, i0 + 1, i0)
    lam1 = src - i0.to(ACC_DTYPE)
    return i0, i1, 1.0 - lam1, lam1


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _upsample_fwd_kernel(
    x_ptr,                      # [N, C, H, W] NCHW or channels_last; pixel hw at hw * stride_xhw
    br_ptr,                     # branches [N, R, S] contiguous, packed bins
    out_ptr,                    # [N, C + NB*R, H, W], x's memory format; pixel hw at hw * stride_ohw
    bin_ptr,                    # i32 [2, NB]: sizes, packed offsets
    scale_ptr,                  # acc [2, NB]: scale_h, scale_w
    C, R, S, H, W, X_BLOCKS,    # X_BLOCKS: channel blocks that copy x (0: x is already in out)
    stride_xn, stride_xc, stride_xhw,
    stride_on, stride_oc, stride_ohw,
    NB: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_HW: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (hw blocks, channel blocks, N). Channel blocks [0, X_BLOCKS) copy x; the rest
    # are (bin k, block of BLOCK_CH of its R channels) and interpolate: the taps depend only on hw and
    # the bin (vectors of BLOCK_HW), the 4 gathers hit the tiny branches tensor (L1/L2). Every output
    # element is written exactly once, along the layout's contiguous dim (see UPSAMPLE_FWD_CONFIGS).
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    chb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    mask_hw = hw < H * W
    n_xblocks = X_BLOCKS
    if chb < n_xblocks:
        offs_c = chb * BLOCK_CH + tl.arange(0, BLOCK_CH)
        mask = (offs_c < C)[:, None] & mask_hw[None, :]
        v = tl.load(x_ptr + n * stride_xn + offs_c[:, None].to(tl.int64) * stride_xc
                    + hw[None, :].to(tl.int64) * stride_xhw, mask=mask)
        tl.store(out_ptr + n * stride_on + offs_c[:, None].to(tl.int64) * stride_oc
                 + hw[None, :].to(tl.int64) * stride_ohw, v, mask=mask)
    else:
        n_rblocks = tl.cdiv(R, BLOCK_CH)
        k = (chb - n_xblocks) // n_rblocks
        offs_r = ((chb - n_xblocks) % n_rblocks) * BLOCK_CH + tl.arange(0, BLOCK_CH)
        mask = (offs_r < R)[:, None] & mask_hw[None, :]
        b = tl.load(bin_ptr + k)
        off = tl.load(bin_ptr + NB + k)
        h0, h1, lh0, lh1 = _taps(hw // W, tl.load(scale_ptr + k), b, ACC_DTYPE)
        w0, w1, lw0, lw1 = _taps(hw % W, tl.load(scale_ptr + NB + k), b, ACC_DTYPE)
        src = br_ptr + (n * R + offs_r[:, None]) * S + off                     # [BLOCK_CH, 1]
        v00 = tl.load(src + (h0 * b + w0)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        v01 = tl.load(src + (h0 * b + w1)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        v10 = tl.load(src + (h1 * b + w0)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        v11 = tl.load(src + (h1 * b + w1)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        val = (lh0[None, :] * (lw0[None, :] * v00 + lw1[None, :] * v01)
               + lh1[None, :] * (lw0[None, :] * v10 + lw1[None, :] * v11))
        ch = C + k * R + offs_r
        tl.store(out_ptr + n * stride_on + ch[:, None].to(tl.int64) * stride_oc
                 + hw[None, :].to(tl.int64) * stride_ohw, val.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_CH, BLOCK_HW, num_warps): a pure streaming pass, so the tile follows the layout: NCHW tiles are
# long along hw (contiguous), channels_last tiles along channels (contiguous).
UPSAMPLE_FWD_CONFIGS = {"nchw": (4, 256, 4), "cl": (64, 16, 4)}


def _launch_forward(x: torch.Tensor | None, branches: torch.Tensor, out: torch.Tensor, bins: Sequence[int],
                    channels: int, config: str | None) -> None:
    """Write the branches (and x unless it is None) into ``out``: one launch."""
    n, _, h, w = out.shape
    _, r, s = branches.shape
    assert branches.is_contiguous()
    nb = len(bins)
    ints, scales, _ = _tables(bins, h, w, out.dtype, out.device)
    bch, bhw, nw = UPSAMPLE_FWD_CONFIGS[config or ("cl" if is_channels_last(out) else "nchw")]
    x_blocks = 0 if x is None else triton.cdiv(channels, bch)
    src = out if x is None else x                     # x's strides are unused when it is not copied
    grid = (triton.cdiv(h * w, bhw), x_blocks + nb * triton.cdiv(r, bch), n)
    assert grid[1] < 65536 and grid[2] < 65536, grid
    _upsample_fwd_kernel[grid](
        src, branches, out, ints, scales, channels, r, s, h, w, x_blocks,
        src.stride(0), src.stride(1), flat_hw_stride(src), out.stride(0), out.stride(1), flat_hw_stride(out),
        NB=nb, BLOCK_CH=bch, BLOCK_HW=bhw, ACC_DTYPE=acc_tl(out.dtype), num_warps=nw)


def upsample_concat(x: torch.Tensor, branches: torch.Tensor, bins: Sequence[int], *,
                    config: str | None = None) -> torch.Tensor:
    """Concat of x and every branch upsampled bilinearly (align_corners=True) to x's size.

    Args:
        x: [N, C, H, W], NCHW or channels_last, fp16/bf16/fp32/fp64.
        branches: [N, R, S] contiguous, x's dtype, packed bins.
        config: force an ``UPSAMPLE_FWD_CONFIGS`` entry (tests, tuning); default: by layout.
    Returns:
        [N, C + nb*R, H, W] in x's dtype and memory format; channels x, then bins in order.
    """
    n, c, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(n, c + len(bins) * branches.shape[1], h, w, dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    if out.numel():
        _launch_forward(x, branches, out, bins, c, config)
    return out


def upsample_into(concat: torch.Tensor, branches: torch.Tensor, bins: Sequence[int], channels: int, *,
                  config: str | None = None) -> None:
    """Write every branch, upsampled, into ``concat[:, channels:]`` in place (x is already in the first
    ``channels`` channels, from ``multibin_avg_pool_with_concat``): only the branch half of the concat is written.

    Args:
        concat: [N, channels + nb*R, H, W], NCHW or channels_last; branches: [N, R, S] contiguous.
    """
    if concat.numel():
        _launch_forward(None, branches, concat, bins, channels, config)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _upsample_bwd_kernel(
    g_ptr,                      # grad_out [N, C + NB*R, H, W], NCHW or channels_last (any n, c, h, w strides)
    out_ptr,                    # [N, R, S] contiguous, grad_out's dtype
    bin_ptr, scale_ptr,         # tables as in _upsample_fwd_kernel
    start_ptr,                  # i32 [NB, SB]: first image row of each source-row band, then H (see _tables)
    C, R, S, H, W_VEC, SB,      # W = W_VEC * VEC
    stride_gn, stride_gc, stride_gh, stride_gw,     # n, c, h strides in units of VEC elements
    NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    CELL_PAD: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (nb * R blocks, N); program (n, bin k, block of BLOCK_R channels) owns the b x b
    # gradient cells of its channels and reads its [BLOCK_R, H, W] slab of grad_out once, W in BLOCK_W
    # chunks. Separable transposed interpolation in a fixed order, as the C++ kernels: the image rows
    # whose first tap is source row i (band i, rows ascending, [BLOCK_R, BLOCK_H, BLOCK_W] tiles: all
    # their loads in flight at once) are spread onto two running rows, cur (source row i, weight
    # 1 - lambda_h) and nxt (row i + 1, weight lambda_h; both on row i at the last row); after band i,
    # cur is complete and is cut into the b cells (i, j) along w (selections of its two taps, w
    # ascending), then nxt becomes cur. No tap-matrix products: a non-finite gradient reaches exactly
    # the cells whose taps read it.
    n = tl.program_id(1).to(tl.int64)
    k, offs_r, mask_r, b, off = bin_channel_block(tl.program_id(0), R, bin_ptr, NB, BLOCK_R)
    scale_h = tl.load(scale_ptr + k)
    scale_w = tl.load(scale_ptr + NB + k)
    W = W_VEC * VEC
    cell = tl.arange(0, CELL_PAD)
    g_chan = (n * stride_gn + (C + k * R + offs_r).to(tl.int64) * stride_gc)[:, None, None]
    mask_c = mask_r[:, None, None]

    acc = tl.zeros([BLOCK_R, CELL_PAD], dtype=ACC_DTYPE)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        tw0, tw1, lw0, lw1 = _taps(w, scale_w, b, ACC_DTYPE)
        cur = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC_DTYPE)
        nxt = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC_DTYPE)
        for i in range(0, b):
            h_end = tl.load(start_ptr + k * SB + i + 1)
            for h_start in range(tl.load(start_ptr + k * SB + i), h_end, BLOCK_H):
                h = h_start + tl.arange(0, BLOCK_H)
                _, th1, lh0, lh1 = _taps(h, scale_h, b, ACC_DTYPE)    # first tap: i (this band)
                both = th1 == i                                      # last source row: both taps on it
                w_cur = lh0 + tl.where(both, lh1, 0.0)
                w_nxt = tl.where(both, 0.0, lh1)
                offs = (g_chan + h.to(tl.int64)[None, :, None] * stride_gh) * VEC + w[None, None, :] * stride_gw
                mask = mask_c & (h < h_end)[None, :, None] & (w < W)[None, None, :]
                gt = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                cur += tl.sum(gt * w_cur[None, :, None], axis=1)
                nxt += tl.sum(gt * w_nxt[None, :, None], axis=1)
            for j in range(0, b):
                part = tl.sum(tl.where((tw0 == j)[None, :], lw0[None, :] * cur, 0.0)
                              + tl.where((tw1 == j)[None, :], lw1[None, :] * cur, 0.0), axis=1)
                acc += tl.where((cell == i * b + j)[None, :], part[:, None], 0.0)
            cur = nxt
            nxt = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC_DTYPE)

    dst = out_ptr + (n * R + offs_r.to(tl.int64))[:, None] * S + off + cell[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & (cell < b * b)[None, :])


# (BLOCK_R, BLOCK_H, BLOCK_W, num_warps): 16 image rows per tile (a whole source-row band at 60x60 and 90x90
# for bins 3 and 6). "nchw" / "nchw_wide" (w contiguous, W <= 64 / wider): 2048 elements, loads VEC wide
# (see pooling.row_vec); "cl" (channels contiguous): 16 channels (>= 32 bytes per pixel) by 16 columns,
# 4096 elements at 8 warps; "cl_small": 8 channels, for launches with too few programs (N=1).
UPSAMPLE_BWD_CONFIGS = {"nchw": (2, 16, 64, 4), "nchw_wide": (1, 16, 128, 4), "cl": (16, 16, 16, 8),
                        "cl_small": (8, 16, 32, 8)}
MIN_PROGRAMS = 264          # two per SM of an H100 (132 SMs)


def _upsample_bwd_config(channels_last: bool, programs_cl: int, w: int) -> str:
    if channels_last:
        return "cl" if programs_cl >= MIN_PROGRAMS else "cl_small"
    return "nchw" if w <= 64 else "nchw_wide"


def upsample_concat_backward(grad_out: torch.Tensor, bins: Sequence[int], channels: int, *,
                             config: str | None = None) -> torch.Tensor:
    """Gradient of :func:`upsample_concat` w.r.t. the packed branches (deterministic, no atomics).

    Args:
        grad_out: [N, C + nb*R, H, W], NCHW or channels_last (read in place), fp16/bf16/fp32/fp64.
        bins: bin sizes; channels: C, the pass-through channels at the front of grad_out.
        config: force an ``UPSAMPLE_BWD_CONFIGS`` entry (tests, tuning); default: heuristic.
    Returns:
        [N, R, S] contiguous in grad_out's dtype, accumulated in fp32 (fp64 for fp64).
    """
    n, total, h, w = grad_out.shape
    nb = len(bins)
    r = (total - channels) // nb
    assert channels + nb * r == total
    s = sum(b * b for b in bins)
    out = torch.empty(n, r, s, dtype=grad_out.dtype, device=grad_out.device)
    if out.numel() == 0:
        return out
    ints, scales, starts = _tables(bins, h, w, grad_out.dtype, grad_out.device)
    cl = grad_out.stride(1) == 1 and total > 1
    name = config or _upsample_bwd_config(cl, n * nb * triton.cdiv(r, UPSAMPLE_BWD_CONFIGS["cl"][0]), w)
    br, bh, bw, nw = UPSAMPLE_BWD_CONFIGS[name]
    vec = row_vec(grad_out.dtype, w, grad_out)
    grid = (nb * triton.cdiv(r, br), n)
    assert grid[1] < 65536, grid
    _upsample_bwd_kernel[grid](
        grad_out, out, ints, scales, starts, channels, r, s, h, w // vec, starts.shape[1],
        *vec_strides(grad_out, vec), NB=nb, BLOCK_R=br, BLOCK_H=bh, BLOCK_W=bw, CELL_PAD=pow2(max(bins) ** 2),
        VEC=vec, ACC_DTYPE=acc_tl(grad_out.dtype), num_warps=nw)
    return out


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

def launcher_configs(dtype: torch.dtype) -> dict:
    """``{"fwd": names, "bwd": (name, VEC) pairs}`` the launchers can pick for ``dtype`` (VEC only where w is
    contiguous)."""
    vecs = [v for v in ROW_VECS if v * torch.empty((), dtype=dtype).element_size() <= 16]
    bwd = [(name, v) for name in UPSAMPLE_BWD_CONFIGS for v in (vecs if name.startswith("nchw") else (1,))]
    return {"fwd": tuple(UPSAMPLE_FWD_CONFIGS), "bwd": tuple(bwd)}


# Backward CELL_PAD: default bins (max 6) -> 64; max bin 9..16 -> 256, registered for the VEC=1 configs.
_BWD_CELLS = {1: (64, 256), 2: (64,), 4: (64,)}


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        tacc = acc_tl(dtype)
        names = launcher_configs(dtype)
        for name in names["fwd"]:
            bch, bhw, nw = UPSAMPLE_FWD_CONFIGS[name]
            out.append((_upsample_fwd_kernel, CompileConfig(
                f"upsample_fwd/{dt}/{name}",
                {"x_ptr": f"*{dt}", "br_ptr": f"*{dt}", "out_ptr": f"*{dt}", "bin_ptr": "*i32",
                 "scale_ptr": f"*{acc}", "C": "i32", "R": "i32", "S": "i32", "H": "i32", "W": "i32",
                 "X_BLOCKS": "i32",
                 "stride_xn": "i32", "stride_xc": "i32", "stride_xhw": "i32",
                 "stride_on": "i32", "stride_oc": "i32", "stride_ohw": "i32",
                 "NB": "constexpr", "BLOCK_CH": "constexpr", "BLOCK_HW": "constexpr", "ACC_DTYPE": "constexpr"},
                dict(NB=4, BLOCK_CH=bch, BLOCK_HW=bhw, ACC_DTYPE=tacc), num_warps=nw)))
        for name, vec in names["bwd"]:
            br, bh, bw, nw = UPSAMPLE_BWD_CONFIGS[name]
            for cells in _BWD_CELLS[vec]:
                out.append((_upsample_bwd_kernel, CompileConfig(
                    f"upsample_bwd/{dt}/{name}/v{vec}/c{cells}",
                    {"g_ptr": f"*{dt}", "out_ptr": f"*{dt}", "bin_ptr": "*i32", "scale_ptr": f"*{acc}",
                     "start_ptr": "*i32", "C": "i32", "R": "i32", "S": "i32", "H": "i32", "W_VEC": "i32", "SB": "i32",
                     "stride_gn": "i32", "stride_gc": "i32", "stride_gh": "i32", "stride_gw": "i32",
                     "NB": "constexpr", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr",
                     "CELL_PAD": "constexpr", "VEC": "constexpr", "ACC_DTYPE": "constexpr"},
                    dict(NB=4, BLOCK_R=br, BLOCK_H=bh, BLOCK_W=bw, CELL_PAD=cells, VEC=vec, ACC_DTYPE=tacc),
                    num_warps=nw)))
    return out
