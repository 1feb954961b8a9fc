"""Implicit-GEMM convolution with the inference epilogue, ``relu?(conv2d(x, w) + bias + residual?)``, and the
training path built on it (per-tile BatchNorm statistics in the conv's epilogue, a two-level ordered merge,
one BatchNorm + residual + ReLU pass; the BatchNorm + ReLU backward in two passes and a two-level sum).

GEMM view: M = N * Ho * Wo output pixels, N_gemm = O output channels, K = kh * kw * C. One program owns a
BLOCK_M x BLOCK_N output tile and walks K in one loop, so the software pipeline runs across the taps. Per K
step the A tile is the input pixels a tap reads (``hi = ho * stride - padding + ky * dilation``, masked to
zero outside the image: the conv's zero padding, which makes dilation free), the B tile the weight at the
same (tap, channel) pairs. K is walked either in channel slices, step s = (tap, BLOCK_K channels of it),
or, for small C (the stem's C=3, where a slice would fill little of a step), packed: k = tap * C + c, each
k gathered as (k // C, k % C). Reads follow the tensors' strides, so channels_last x and weight (the
layout the backbone runs in) give unit-stride loads along K; NCHW works too (with BLOCK_N 64, see
:func:`_blocks`). Accumulation is fp32 (fp64 for fp64); fp32 operands multiply in TF32 exactly when the
eager cuDNN convolution would (``conv_dot_precision``: a GPU tensor and ``torch.backends.cudnn.allow_tf32``,
PyTorch's default), else in IEEE fp32. The epilogue adds the bias (BatchNorm folded into the weight), the
residual, applies ReLU and stores in the output's layout: one pass, no atomics, bitwise deterministic.
Program order groups GROUP_M row tiles per column sweep for L2 reuse of the weight.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import conv_output_size, is_channels_last
from .common import (BLOCK_ROWS, MERGE_BLOCK_T, SIG_DTYPE, CompileConfig, _merge_tiles_kernel,
                     _sum_rows_kernel, acc_dtype, acc_tl, bn_vectors, channel_invstd, conv_dot_precision, dot_upcast,
                     eps_args, merge_tiles, relu_nan, sum_rows)

GROUP_M = 8


@triton.jit
def _slice_tiles(x_ptr, w_ptr, step, c_steps, x_row, h0, w0, mask_m, w_col, mask_n, offs_k, C, H, W, dilation,
                 sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """K step ``step`` of the channel-slice walk: tap ``step // c_steps``, its channels from
    ``(step % c_steps) * BLOCK_K`` on. The A tile is the input pixels the tap reads (masked to zero outside
    the image), the B tile the weight's slice."""
    tap = step // c_steps
    ky, kx = tap // KW, tap % KW
    dy, dx = ky * dilation, kx * dilation
    c = (step - tap * c_steps) * BLOCK_K + offs_k
    mask_c = c < C
    inside = mask_m & (h0 >= -dy) & (h0 < H - dy) & (w0 >= -dx) & (w0 < W - dx)
    a = tl.load(x_ptr + x_row[:, None] + (dy * sx_h + dx * sx_w + c * sx_c)[None, :],
                mask=inside[:, None] & mask_c[None, :], other=0.0)
    b = tl.load(w_ptr + w_col[None, :] + (ky * sw_h + kx * sw_w + c * sw_c)[:, None],
                mask=mask_c[:, None] & mask_n[None, :], other=0.0)
    return a, b


@triton.jit
def _packed_tiles(x_ptr, w_ptr, step, x_row, h0, w0, mask_m, w_col, mask_n, offs_k, C, H, W, dilation,
                  sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """K step ``step`` of the packed walk (small C): k = step * BLOCK_K + [0, BLOCK_K) over K = KH * KW * C,
    each k gathered as (tap, channel) = (k // C, k % C)."""
    k = step * BLOCK_K + offs_k
    tap = k // C
    c = k - tap * C
    ky = tap // KW
    kx = tap - ky * KW
    dy, dx = ky * dilation, kx * dilation
    mask_k = k < KH * KW * C
    hi = h0[:, None] + dy[None, :]
    wi = w0[:, None] + dx[None, :]
    inside = (mask_m[:, None] & mask_k[None, :]) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    a = tl.load(x_ptr + x_row[:, None] + (dy * sx_h + dx * sx_w + c * sx_c)[None, :], mask=inside, other=0.0)
    b = tl.load(w_ptr + w_col[None, :] + (ky * sw_h + kx * sw_w + c * sw_c)[:, None],
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return a, b


@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
        C, H, W, O, HO, WO, M, stride, padding, dilation,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w, so_n, so_c, so_h, so_w, sr_n, sr_c, sr_h, sr_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
        STATS: tl.constexpr, PACK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
        ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(O, BLOCK_N)
    group = pid // (GROUP * tiles_n)
    first_m = group * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * tiles_n)) % rows
    pid_n = (pid % (GROUP * tiles_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < O
    n_img = offs_m // (HO * WO)
    pix = offs_m % (HO * WO)
    ho, wo = pix // WO, pix % WO
    h0, w0 = ho * stride - padding, wo * stride - padding    # the input pixel tap (0, 0) reads
    x_row = n_img * sx_n + h0 * sx_h + w0 * sx_w
    w_col = offs_n * sw_o
    offs_k = tl.arange(0, BLOCK_K)
    if PACK_K:
        steps = tl.cdiv(KH * KW * C, BLOCK_K)
    else:
        c_steps = tl.cdiv(C, BLOCK_K)
        steps = KH * KW * c_steps
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for step in range(steps):      # one loop over K: the software pipeline runs across taps
        if PACK_K:
            a, b = _packed_tiles(x_ptr, w_ptr, step, x_row, h0, w0, mask_m, w_col, mask_n, offs_k, C, H, W,
                                 dilation, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, KH, KW, BLOCK_K)
        else:
            a, b = _slice_tiles(x_ptr, w_ptr, step, c_steps, x_row, h0, w0, mask_m, w_col, mask_n, offs_k, C, H, W,
                                dilation, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, KW, BLOCK_K)
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if ACC_DTYPE == tl.float64:
            acc = tl.dot(a, b, acc, out_dtype=tl.float64)
        elif a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    tile = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n_img * sr_n + ho * sr_h + wo * sr_w)[:, None] + offs_n[None, :] * sr_c, mask=tile,
                    other=0.0)
        acc += r.to(ACC_DTYPE)
    if RELU:
        acc = relu_nan(acc)
    out = out_ptr + (n_img * so_n + ho * so_h + wo * so_w)[:, None] + offs_n[None, :] * so_c
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out, stored, mask=tile)
    if STATS:  # this tile's per-channel (mean, M2) of the output as stored (BatchNorm's input)
        count = tl.cast(tl.minimum(M - pid_m * BLOCK_M, BLOCK_M), ACC_DTYPE)
        y = tl.where(mask_m[:, None], stored.to(ACC_DTYPE), 0.0)
        mean = tl.sum(y, axis=0) / count
        d = tl.where(mask_m[:, None], y - mean[None, :], 0.0)
        prow = part_ptr + pid_m.to(tl.int64) * O + offs_n
        tl.store(prow, mean, mask=mask_n)
        tl.store(prow + tiles_m.to(tl.int64) * O, tl.sum(d * d, axis=0), mask=mask_n)



#: the BatchNorm passes' (pixel, channel) tiles: 16 elements per thread, so that NCHW tensors (an address per
#: element) stay within 128 registers: 25 % occupancy or more
EW_BLOCK_M, EW_BLOCK_O, EW_WARPS = 32, 64, 4


@triton.jit
def _pixel_tile(O, HO, WO, M, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    """Program -> (its pixels' (n, ho, wo), its channels, masks) for the (pixel block, channel block) grid."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    n_img = offs_m // (HO * WO)
    pix = offs_m % (HO * WO)
    return n_img, pix // WO, pix % WO, offs_o, offs_m < M, offs_o < O


@triton.jit
def _at(n_img, ho, wo, offs_o, s_n, s_c, s_h, s_w):
    return (n_img * s_n + ho * s_h + wo * s_w)[:, None] + offs_o[None, :] * s_c


@triton.jit
def _bn_act_kernel(y_ptr, res_ptr, out_ptr, mean_ptr, var_ptr, bn_weight_ptr, bn_bias_ptr, O, HO, WO, M, eps_hi, eps_lo,
                   sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out = relu?((y - mean) * bn_weight / sqrt(var + eps) + bn_bias + residual?), written in y's layout."""
    n_img, ho, wo, offs_o, mask_m, mask_o = _pixel_tile(O, HO, WO, M, BLOCK_M, BLOCK_O)
    tile = mask_m[:, None] & mask_o[None, :]
    _, scale, shift, _ = bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o, eps_hi, eps_lo,
                                    ACC_DTYPE)
    at = _at(n_img, ho, wo, offs_o, sy_n, sy_c, sy_h, sy_w)
    z = tl.load(y_ptr + at, mask=tile, other=0.0).to(ACC_DTYPE) * scale[None, :] + shift[None, :]
    if HAS_RES:
        z += tl.load(res_ptr + _at(n_img, ho, wo, offs_o, sr_n, sr_c, sr_h, sr_w), mask=tile, other=0.0).to(ACC_DTYPE)
    if RELU:
        z = relu_nan(z)
    tl.store(out_ptr + at, z.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _masked_grad(g_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, n_img, ho, wo, offs_o, tile, mask_o, eps_hi, eps_lo,
                 sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sy_n, sy_c, sy_h, sy_w, RELU: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """(ReLU-masked output gradient, xhat, invstd) of one tile, in the accumulation dtype."""
    g = tl.load(g_ptr + _at(n_img, ho, wo, offs_o, sg_n, sg_c, sg_h, sg_w), mask=tile, other=0.0).to(ACC_DTYPE)
    if RELU:
        o = tl.load(out_ptr + _at(n_img, ho, wo, offs_o, so_n, so_c, so_h, so_w), mask=tile, other=0.0)
        g = tl.where(o.to(ACC_DTYPE) > 0, g, 0.0)
    invstd = channel_invstd(var_ptr, offs_o, mask_o, eps_hi, eps_lo, ACC_DTYPE)
    y = tl.load(y_ptr + _at(n_img, ho, wo, offs_o, sy_n, sy_c, sy_h, sy_w), mask=tile, other=0.0).to(ACC_DTYPE)
    xhat = tl.where(tile, (y - tl.load(mean_ptr + offs_o, mask=mask_o, other=0.0)[None, :]) * invstd[None, :], 0.0)
    return g, xhat, invstd


@triton.jit
def _bn_act_bwd_sums_kernel(g_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, part_ptr, O, HO, WO, M, eps_hi, eps_lo,
                            sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sy_n, sy_c, sy_h, sy_w,
                            RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Per (pixel block, channel block): sum(g * xhat) and sum(g) of the masked gradient -> part[2, blocks, O]."""
    n_img, ho, wo, offs_o, mask_m, mask_o = _pixel_tile(O, HO, WO, M, BLOCK_M, BLOCK_O)
    tile = mask_m[:, None] & mask_o[None, :]
    g, xhat, _ = _masked_grad(g_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, n_img, ho, wo, offs_o, tile, mask_o, eps_hi,
                              eps_lo, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sy_n, sy_c, sy_h, sy_w, RELU,
                              ACC_DTYPE)
    prow = part_ptr + tl.program_id(0).to(tl.int64) * O + offs_o
    tl.store(prow, tl.sum(g * xhat, axis=0), mask=mask_o)
    tl.store(prow + tl.num_programs(0).to(tl.int64) * O, tl.sum(g, axis=0), mask=mask_o)


@triton.jit
def _bn_act_bwd_kernel(g_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, bn_weight_ptr, sums_ptr, gy_ptr, gr_ptr, O, HO, WO, M,
                       eps_hi, eps_lo, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sy_n, sy_c, sy_h, sy_w,
                       HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                       ACC_DTYPE: tl.constexpr):
    """grad_y = bn_weight * invstd * (g - sum(g) / M - xhat * sum(g xhat) / M) and, with a residual, its gradient
    g (the masked output gradient)."""
    n_img, ho, wo, offs_o, mask_m, mask_o = _pixel_tile(O, HO, WO, M, BLOCK_M, BLOCK_O)
    tile = mask_m[:, None] & mask_o[None, :]
    g, xhat, invstd = _masked_grad(g_ptr, out_ptr, y_ptr, mean_ptr, var_ptr, n_img, ho, wo, offs_o, tile, mask_o,
                                   eps_hi, eps_lo, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sy_n, sy_c, sy_h,
                                   sy_w, RELU, ACC_DTYPE)
    count = tl.cast(M, ACC_DTYPE)
    sum_gx = tl.load(sums_ptr + offs_o, mask=mask_o, other=0.0)
    sum_g = tl.load(sums_ptr + O + offs_o, mask=mask_o, other=0.0)
    scale = tl.load(bn_weight_ptr + offs_o, mask=mask_o, other=0.0) * invstd
    gy = scale[None, :] * (g - (sum_g / count)[None, :] - xhat * (sum_gx / count)[None, :])
    at = _at(n_img, ho, wo, offs_o, sy_n, sy_c, sy_h, sy_w)
    tl.store(gy_ptr + at, gy.to(gy_ptr.dtype.element_ty), mask=tile)
    if HAS_RES:
        tl.store(gr_ptr + at, g.to(gr_ptr.dtype.element_ty), mask=tile)


def _blocks(dtype: torch.dtype, out_channels: int, in_channels: int, taps: int, channels_last: bool) -> dict:
    """Tile shape, K walk and pipeline depth: BLOCK_M x BLOCK_N x 32 with 8 warps for fp32 (TF32 tensor cores)
    and 16-bit operands, 64 x 64 x 16 for fp64. K is packed (PACK_K) when a channel slice would fill under one
    K step (C < BLOCK_K, the stem's C=3) and there are several taps (a 1x1 conv's K is C either way).
    BLOCK_N is 128 for O > 64 in channels_last with the slice walk, else 64: in NCHW the epilogue reads and
    writes every element at its own address, and 128 x 128 tiles spill there; the packed walk (the stem, O=64)
    keeps to one config per kernel size. Stages: 4 for 16-bit (64 KB of shared memory at 128 x 128), 3 for
    fp32 at 128 x 128 (96 KB), 2 at 128 x 64, which keeps a 1x1 conv at 128 registers (two programs per SM)
    without a spill."""
    block_k = 16 if dtype == torch.float64 else 32
    pack = taps > 1 and in_channels < block_k
    if dtype == torch.float64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, PACK_K=pack, num_warps=4, num_stages=2)
    block_n = 128 if out_channels > 64 and channels_last and not pack else 64
    stages = 4 if dtype != torch.float32 else 3 if block_n == 128 else 2
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, PACK_K=pack, num_warps=8, num_stages=stages)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
          stride: int, padding: int, dilation: int, relu: bool, stats: bool):
    """Launch the implicit GEMM; returns ``(out, part, BLOCK_M)``, part [2, tiles_m, O] the per-tile (mean, M2)
    of BLOCK_M pixels each when ``stats`` (else None). ``out`` is allocated in x's memory format."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding, dilation), conv_output_size(w, kw, stride, padding, dilation)
    channels_last = is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, o, ho, wo, dtype=x.dtype, device=x.device, memory_format=fmt)
    weight = weight.to(x.dtype)
    res = residual if residual is not None else out
    cfg = _blocks(x.dtype, o, c, kh * kw, channels_last)
    m = n * ho * wo
    tiles_m = triton.cdiv(m, cfg["BLOCK_M"])
    part = torch.empty(2, tiles_m, o, dtype=acc_dtype(x.dtype), device=x.device) if stats else None
    _conv_fwd_kernel[(tiles_m * triton.cdiv(o, cfg["BLOCK_N"]),)](
        x, weight, bias.to(acc_dtype(x.dtype)) if bias is not None else out, res, out, part if stats else out,
        c, h, w, o, ho, wo, m, stride, padding, dilation, *x.stride(), *weight.stride(), *out.stride(), *res.stride(),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu, STATS=stats,
        GROUP=GROUP_M, ACC_DTYPE=acc_tl(x.dtype), DOT_UPCAST=dot_upcast(x.dtype),
        DOT_PRECISION=conv_dot_precision(x.dtype, x.device), **cfg)
    return out, part, cfg["BLOCK_M"]


def folded_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    """Contract of ``psp_kernels.reference.folded_conv`` (output in x's memory format)."""
    return _conv(x, weight, bias, residual, stride, padding, dilation, relu, False)[0]


def _ew_grid(m: int, o: int) -> tuple[int, int]:
    return (triton.cdiv(m, EW_BLOCK_M), triton.cdiv(o, EW_BLOCK_O))


def training_conv(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                  residual: torch.Tensor | None, stride: int, padding: int, dilation: int, relu: bool, eps: float):
    """Contract of ``psp_kernels.reference.training_conv``: ``(out, bn_input, mean, var)``. Three or four
    launches: the conv with per-tile statistics in its epilogue, the two-level ordered merge of the tiles
    (:func:`~.common.merge_tiles`: one launch up to MERGE_BLOCK_T tiles) and one pass of BatchNorm + residual + ReLU."""
    y, part, tile_pixels = _conv(x, weight, None, None, stride, padding, dilation, False, True)
    n, o, ho, wo = y.shape
    m, acc = n * ho * wo, acc_dtype(x.dtype)
    mean, var = merge_tiles(part, m, tile_pixels, EW_BLOCK_O, EW_WARPS)
    out = torch.empty_like(y)
    res = residual if residual is not None else y
    bn_weight, bn_bias = bn_weight.to(acc).contiguous(), bn_bias.to(acc).contiguous()
    _bn_act_kernel[_ew_grid(m, o)](y, res, out, mean, var, bn_weight, bn_bias, o, ho, wo, m, *eps_args(eps),
                                   *y.stride(),
                                   *res.stride(), HAS_RES=residual is not None, RELU=relu, BLOCK_M=EW_BLOCK_M,
                                   BLOCK_O=EW_BLOCK_O, ACC_DTYPE=acc_tl(x.dtype), num_warps=EW_WARPS)
    return out, y, mean, var


def training_conv_bn_backward(grad_out: torch.Tensor, bn_input: torch.Tensor, out: torch.Tensor,
                              bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                              relu: bool, eps: float, has_residual: bool):
    """Contract of ``psp_kernels.reference.training_conv_bn_backward``: ``(grad_bn_input, grad_residual,
    grad_bn)``. Three or four launches: per-tile BatchNorm sums, their two-level ordered sum
    (:func:`~psp_kernels.triton.common.sum_rows`: one launch up to BLOCK_ROWS rows of pixel blocks), then the
    gradient of the conv output (BatchNorm's input) and the residual's gradient."""
    y = bn_input
    n, o, ho, wo = y.shape
    m, acc = n * ho * wo, acc_dtype(y.dtype)
    bn_weight = bn_weight.to(acc).contiguous()
    grid = _ew_grid(m, o)
    part = torch.empty(2, grid[0], o, dtype=acc, device=y.device)
    sums = torch.empty(2, o, dtype=acc, device=y.device)
    strides = (*grad_out.stride(), *out.stride(), *y.stride())
    consts = dict(RELU=relu, BLOCK_M=EW_BLOCK_M, BLOCK_O=EW_BLOCK_O, ACC_DTYPE=acc_tl(y.dtype), num_warps=EW_WARPS)
    _bn_act_bwd_sums_kernel[grid](grad_out, out, y, mean, var, part, o, ho, wo, m, *eps_args(eps), *strides, **consts)
    sum_rows(part, sums, EW_BLOCK_O, EW_WARPS)
    grad_y = torch.empty_like(y)
    grad_res = torch.empty_like(y, dtype=grad_out.dtype) if has_residual else y.new_empty(0, dtype=grad_out.dtype)
    _bn_act_bwd_kernel[grid](grad_out, out, y, mean, var, bn_weight, sums, grad_y, grad_res if has_residual else grad_y,
                             o, ho, wo, m, *eps_args(eps), *strides, HAS_RES=has_residual, **consts)
    return grad_y, grad_res, sums


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

#: Kernel sizes of the ResNet backbones (1x1, the deep stem's and the blocks' 3x3, torchvision's 7x7 stem) and
#: the conv epilogues (bias, residual, ReLU, statistics): conv + folded BN + ReLU, the block end (+ shortcut,
#: ReLU), downsample (no ReLU), and the training conv (raw output + per-tile statistics).
KERNEL_SIZES = (1, 3, 7)
EPILOGUES = ((True, False, True, False), (True, True, True, False), (True, False, False, False),
             (False, False, False, True))
#: (residual, ReLU) of the BatchNorm passes.
BN_EPILOGUES = ((False, True), (True, True), (False, False))


def _ints(*names: str) -> dict:
    return {name: "i32" for name in names}


STRIDES = ("n", "c", "h", "w")


def _strides(prefix: str) -> dict:
    return _ints(*(f"{prefix}_{s}" for s in STRIDES))


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every kernel size, epilogue and tile choice (BLOCK_N, K walk) of the conv
    (fp32 with DOT_PRECISION "tf32", what a GPU runs by default), the statistics merge and sum, and every
    flag combination of the BatchNorm passes, per dtype (stride, padding and dilation are runtime arguments)."""
    out = []
    conv_ints = {**_ints("C", "H", "W", "O", "HO", "WO", "M", "stride", "padding", "dilation"), **_strides("sx"),
                 **_ints("sw_o", "sw_c", "sw_h", "sw_w"), **_strides("so"), **_strides("sr")}
    eps = {"eps_hi": "fp32", "eps_lo": "fp32"}
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        tacc = acc_tl(dtype)
        for k in KERNEL_SIZES:
            # the distinct configs of (C, O): slices at BLOCK_N 64 and 128, packed (small C)
            variants = {str(b): b for b in (_blocks(dtype, o, c, k * k, True) for c in (256, 3) for o in (64, 256))}
            for blocks in variants.values():
                warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
                for has_bias, has_res, relu, stats in EPILOGUES:
                    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{acc}" if has_bias else f"*{dt}",
                           "res_ptr": f"*{dt}", "out_ptr": f"*{dt}", "part_ptr": f"*{acc}" if stats else f"*{dt}",
                           **conv_ints}
                    consts = dict(KH=k, KW=k, HAS_BIAS=has_bias, HAS_RES=has_res, RELU=relu, STATS=stats,
                                  GROUP=GROUP_M, ACC_DTYPE=tacc, DOT_UPCAST=False,
                                  DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee", **blocks)
                    sig.update({name: "constexpr" for name in consts})
                    tag = "stats" if stats else ("res_" if has_res else "") + ("relu" if relu else "linear")
                    cfg_name = f"conv_fwd/{dt}/k{k}{'/packed' if blocks['PACK_K'] else ''}/n{blocks['BLOCK_N']}/{tag}"
                    out.append((_conv_fwd_kernel, CompileConfig(cfg_name, sig, consts, num_warps=warps,
                                                                num_stages=stages)))
        ew = dict(BLOCK_M=EW_BLOCK_M, BLOCK_O=EW_BLOCK_O, ACC_DTYPE=tacc)
        bn = {"mean_ptr": f"*{acc}", "var_ptr": f"*{acc}"}
        shape = _ints("O", "HO", "WO", "M")
        for has_res, relu in BN_EPILOGUES:
            flags = dict(HAS_RES=has_res, RELU=relu)
            tag = ("res_" if has_res else "") + ("relu" if relu else "linear")
            out.append((_bn_act_kernel, CompileConfig(
                f"bn_act/{dt}/{tag}", {"y_ptr": f"*{dt}", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}", **bn,
                                      "bn_weight_ptr": f"*{acc}", "bn_bias_ptr": f"*{acc}", **shape, **eps,
                                      **_strides("sy"), **_strides("sr"), **{n: "constexpr" for n in (*flags, *ew)}},
                dict(**flags, **ew), num_warps=EW_WARPS)))
            grads = {"g_ptr": f"*{dt}", "out_ptr": f"*{dt}", "y_ptr": f"*{dt}", **bn}
            gstrides = {**_strides("sg"), **_strides("so"), **_strides("sy")}
            out.append((_bn_act_bwd_kernel, CompileConfig(
                f"bn_act_bwd/{dt}/{tag}", {**grads, "bn_weight_ptr": f"*{acc}", "sums_ptr": f"*{acc}",
                                          "gy_ptr": f"*{dt}", "gr_ptr": f"*{dt}", **shape, **eps, **gstrides,
                                          **{n: "constexpr" for n in (*flags, *ew)}},
                dict(**flags, **ew), num_warps=EW_WARPS)))
            if not has_res:
                out.append((_bn_act_bwd_sums_kernel, CompileConfig(
                    f"bn_act_bwd_sums/{dt}/{'relu' if relu else 'linear'}",
                    {**grads, "part_ptr": f"*{acc}", **shape, **eps, **gstrides,
                     **{n: "constexpr" for n in ("RELU", *ew)}}, dict(RELU=relu, **ew), num_warps=EW_WARPS)))
        if dtype not in (torch.float32, torch.float64):
            continue                    # the merges read accumulation-dtype partials only
        out.append((_merge_tiles_kernel, CompileConfig(
            f"merge_tiles/{dt}", {"part_ptr": f"*{acc}", "mean_ptr": f"*{acc}", "m2_ptr": f"*{acc}",
                                  **_ints("TILES", "O", "M", "TILE_PIXELS", "TILES_PER_PROGRAM", "M2_DIVISOR"),
                                  "BLOCK_T": "constexpr", "BLOCK_O": "constexpr", "ACC_DTYPE": "constexpr"},
            dict(BLOCK_T=MERGE_BLOCK_T, BLOCK_O=EW_BLOCK_O, ACC_DTYPE=tacc), num_warps=EW_WARPS)))
        out.append((_sum_rows_kernel, CompileConfig(
            f"conv_sum_rows/{dt}", {"part_ptr": f"*{acc}", "out_ptr": f"*{acc}", **_ints("ROWS", "O"),
                                    "BLOCK_O": "constexpr", "BLOCK_ROWS": "constexpr", "ACC_DTYPE": "constexpr"},
            dict(BLOCK_O=EW_BLOCK_O, BLOCK_ROWS=BLOCK_ROWS, ACC_DTYPE=tacc), num_warps=EW_WARPS)))
    return out
