"""Triton kernels of the bilinear upsampling + concat (``psp::upsample_concat`` and its backward).

Bilinear, align_corners=True, as ATen: for output row h of a bin of size b, ``src = h * (b-1)/(H-1)``
(0 when H == 1), ``h0 = floor(src)``, ``h1 = min(h0 + 1, b - 1)``, ``lambda = src - h0``; the same for w.
The scales ``(b-1)/(H-1)`` and ``(b-1)/(W-1)`` come from a per-bin table in the accumulation dtype.

The concat buffer [N, C + nb*R, H, W] has channels x, then bin 0's R channels, bin 1's, ... (semseg
order). Both NCHW and channels_last satisfy ``stride(h) == W * stride(w)``, so kernels address a pixel by
its flattened index ``hw`` times one stride; tiles are [channels, hw] and coalesce along whichever of the
two has stride 1.

Known deviation (backward): the W reduction is a product with the [W, b] tap matrix, whose zeros
multiply every grad element, so an inf/nan in grad_out turns that row's whole bin into nan (the
reference keeps it to the cells whose taps touch it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets, is_channels_last
from ..table_cache import cached_table
from .common import CompileConfig, SIG_DTYPE, acc_tl, bin_channel_block, flat_hw_stride, pow2

def _tables(bins: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device):
    """(i32 [2, nb] = sizes, packed offsets; acc [2, nb] = scale_h, scale_w), cached per device."""
    dt = acc_dtype(dtype)

    def make():
        ints = torch.tensor([list(bins), list(bin_offsets(bins))], dtype=torch.int32, device=device)
        # Same expression as ATen's area_pixel_compute_scale(align_corners=True), in the acc dtype.
        sh = [torch.tensor(b - 1, dtype=dt) / (height - 1) if height > 1 else torch.tensor(0.0, dtype=dt)
              for b in bins]
        sw = [torch.tensor(b - 1, dtype=dt) / (width - 1) if width > 1 else torch.tensor(0.0, dtype=dt)
              for b in bins]
        return ints, torch.stack([torch.stack(sh), torch.stack(sw)]).to(device)
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
    ints, scales = _tables(bins, h, w, out.dtype, out.device)
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
    g_ptr,                      # grad_out [N, C + NB*R, H, W], any strides (NCHW or channels_last)
    out_ptr,                    # [N, R, S] contiguous, grad_out's dtype
    bin_ptr, scale_ptr,         # tables as in _upsample_fwd_kernel
    C, R, S, H, W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    BI_PAD: tl.constexpr, BJ_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (nb * R blocks, N); program (n, bin k, block of BLOCK_R channels) owns the
    # b x b gradient cells of its channels. Separable transposed interpolation in a fixed order:
    # for each image row h, t[r, j] = sum_w g[r, h, w] * A_w[w, j]  (tl.dot, A_w built from the taps),
    # then the row is added to cells (h0, j), (h1, j) with weights (1 - lambda_h, lambda_h).
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    k, offs_r, mask_r, b, off = bin_channel_block(pid, R, bin_ptr, NB, BLOCK_R)
    scale_h = tl.load(scale_ptr + k)
    scale_w = tl.load(scale_ptr + NB + k)
    ii = tl.arange(0, BI_PAD)
    jj = tl.arange(0, BJ_PAD)

    g_rows = g_ptr + n * stride_gn + (C + k * R + offs_r).to(tl.int64)[:, None] * stride_gc
    acc = tl.zeros([BLOCK_R, BI_PAD, BJ_PAD], dtype=ACC_DTYPE)
    for h in range(0, H):
        t = tl.zeros([BLOCK_R, BJ_PAD], dtype=ACC_DTYPE)
        for w_start in range(0, W, BLOCK_W):
            offs_w = w_start + tl.arange(0, BLOCK_W)
            mask_w = offs_w < W
            gt = tl.load(g_rows + h * stride_gh + offs_w[None, :] * stride_gw,
                         mask=mask_r[:, None] & mask_w[None, :], other=0.0).to(ACC_DTYPE)
            w0, w1, lw0, lw1 = _taps(offs_w, scale_w, b, ACC_DTYPE)
            a_w = (tl.where(jj[None, :] == w0[:, None], lw0[:, None], 0.0)
                   + tl.where(jj[None, :] == w1[:, None], lw1[:, None], 0.0))              # [BLOCK_W, BJ_PAD]
            a_w = tl.where(mask_w[:, None], a_w, 0.0)
            t = tl.dot(gt, a_w.to(ACC_DTYPE), t, input_precision="ieee")
        h0, h1, lh0, lh1 = _taps(h, scale_h, b, ACC_DTYPE)
        a_h = tl.where(ii == h0, lh0, 0.0) + tl.where(ii == h1, lh1, 0.0)                  # [BI_PAD]
        acc += a_h.to(ACC_DTYPE)[None, :, None] * t[:, None, :]

    cell = ii[:, None] * b + jj[None, :]                                                    # [BI_PAD, BJ_PAD]
    mask = mask_r[:, None, None] & ((ii[:, None] < b) & (jj[None, :] < b))[None, :, :]
    dst = out_ptr + (n * R + offs_r.to(tl.int64))[:, None, None] * S + off + cell[None, :, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_R, BLOCK_W, num_warps): "nchw" reads 128-wide rows, "cl" 64 contiguous channels per pixel;
# "small" serves fp64, narrow maps and few channels.
UPSAMPLE_BWD_CONFIGS = {"nchw": (16, 128, 4), "cl": (64, 32, 4), "small": (16, 32, 4)}


def _upsample_bwd_config(dtype: torch.dtype, channels_last: bool, r: int, w: int) -> str:
    if dtype == torch.float64:
        return "small"
    if channels_last:
        return "cl" if r >= 64 else "small"
    return "nchw" if w > 32 else "small"


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
    ints, scales = _tables(bins, h, w, grad_out.dtype, grad_out.device)
    cl = grad_out.stride(1) == 1 and total > 1
    br, bw, nw = UPSAMPLE_BWD_CONFIGS[config or _upsample_bwd_config(grad_out.dtype, cl, r, w)]
    bmax = max(bins)
    grid = (nb * triton.cdiv(r, br), n)
    assert grid[1] < 65536, grid
    _upsample_bwd_kernel[grid](
        grad_out, out, ints, scales, channels, r, s, h, w,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        NB=nb, BLOCK_R=br, BLOCK_W=bw, BI_PAD=pow2(bmax, 1), BJ_PAD=pow2(bmax),
        ACC_DTYPE=acc_tl(grad_out.dtype), num_warps=nw)
    return out


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

def launcher_configs(dtype: torch.dtype) -> dict:
    """``{"fwd": names, "bwd": names}`` the launchers can pick for ``dtype``."""
    bwd = ("small",) if dtype == torch.float64 else tuple(UPSAMPLE_BWD_CONFIGS)
    return {"fwd": tuple(UPSAMPLE_FWD_CONFIGS), "bwd": bwd}


# Backward (BI_PAD, BJ_PAD): default bins (max 6) -> (8, 16); max bin 9..16 -> (16, 16), registered for
# the configs with the largest channel blocks.
_BWD_PADS = {"nchw": ((8, 16), (16, 16)), "cl": ((8, 16), (16, 16)), "small": ((8, 16),)}


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
        for name in names["bwd"]:
            br, bw, nw = UPSAMPLE_BWD_CONFIGS[name]
            for bi, bj in _BWD_PADS[name]:
                out.append((_upsample_bwd_kernel, CompileConfig(
                    f"upsample_bwd/{dt}/{name}/b{bi}",
                    {"g_ptr": f"*{dt}", "out_ptr": f"*{dt}", "bin_ptr": "*i32", "scale_ptr": f"*{acc}",
                     "C": "i32", "R": "i32", "S": "i32", "H": "i32", "W": "i32",
                     "stride_gn": "i32", "stride_gc": "i32", "stride_gh": "i32", "stride_gw": "i32",
                     "NB": "constexpr", "BLOCK_R": "constexpr", "BLOCK_W": "constexpr",
                     "BI_PAD": "constexpr", "BJ_PAD": "constexpr", "ACC_DTYPE": "constexpr"},
                    dict(NB=4, BLOCK_R=br, BLOCK_W=bw, BI_PAD=bi, BJ_PAD=bj, ACC_DTYPE=tacc),
                    num_warps=nw)))
    return out
