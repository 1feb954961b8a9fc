"""Implicit-GEMM convolution with the inference epilogue: ``relu?(conv2d(x, w) + bias + residual?)``.

GEMM view: M = N * Ho * Wo output pixels, N_gemm = O output channels, K = kh * kw * C. One program owns a
BLOCK_M x BLOCK_N output tile; it loops over the kh * kw taps and, per tap, over C in BLOCK_K slices: the A
tile is the input pixels that tap reads (``hi = ho * stride - padding + ky * dilation``, masked to zero
outside the image: the conv's zero padding, which makes dilation free), the B tile the weight's
[BLOCK_K, BLOCK_N] slice at that tap. Reads follow the tensors' strides, so channels_last x and weight
(the layout the backbone runs in) give unit-stride loads along K; NCHW works too. Accumulation is fp32
(fp64 for fp64; fp32 operands multiply in IEEE fp32, not TF32). The epilogue adds the bias (BatchNorm folded
into the weight), the residual, applies ReLU and stores in the output's layout: one pass, no atomics,
bitwise deterministic. Program order groups GROUP_M row tiles per column sweep for L2 reuse of the weight.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .common import SIG_DTYPE, CompileConfig, acc_dtype, acc_tl, dot_upcast, relu_nan

GROUP_M = 8


@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
        C, H, W, O, HO, WO, M, stride, padding, dilation,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w, so_n, so_c, so_h, so_w, sr_n, sr_c, sr_h, sr_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
        ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr):
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
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(KH * KW):
        hi = ho * stride - padding + (tap // KW) * dilation
        wi = wo * stride - padding + (tap % KW) * dilation
        inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        a_row = x_ptr + n_img * sx_n + hi * sx_h + wi * sx_w
        b_col = w_ptr + offs_n * sw_o + (tap // KW) * sw_h + (tap % KW) * sw_w
        for c0 in range(0, C, BLOCK_K):
            k = c0 + offs_k
            mask_k = k < C
            a = tl.load(a_row[:, None] + k[None, :] * sx_c, mask=inside[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_col[None, :] + k[:, None] * sw_c, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if DOT_UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if ACC_DTYPE == tl.float64:
                acc += tl.dot(a, b, out_dtype=tl.float64)
            elif a.dtype == tl.float32:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
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
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile)


def _blocks(dtype: torch.dtype, out_channels: int) -> dict:
    """Tile shape and pipeline depth per dtype: 128 x 128 x 64 for 16-bit operands (128 KB of shared memory
    at 4 stages), 128 x 128 x 32 for fp32, 64 x 64 x 16 for fp64; BLOCK_N 64 when O <= 64."""
    if dtype == torch.float64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)
    block_n = 64 if out_channels <= 64 else 128
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64, num_warps=8, num_stages=4)


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                  stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    """Contract of ``psp_kernels.reference.conv_bias_act`` (output in x's memory format)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty(n, o, ho, wo, dtype=x.dtype, device=x.device, memory_format=fmt)
    weight = weight.to(x.dtype)
    res = residual if residual is not None else out
    cfg = _blocks(x.dtype, o)
    m = n * ho * wo
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(o, cfg["BLOCK_N"]),)
    _conv_fwd_kernel[grid](
        x, weight, bias.to(acc_dtype(x.dtype)) if bias is not None else out, res, out, c, h, w, o, ho, wo, m,
        stride, padding, dilation, *x.stride(), *weight.stride(), *out.stride(), *res.stride(),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu, GROUP=GROUP_M,
        ACC_DTYPE=acc_tl(x.dtype), DOT_UPCAST=dot_upcast(x.dtype), **cfg)
    return out


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

#: Kernel sizes of the ResNet backbones (1x1, the deep stem's and the blocks' 3x3, torchvision's 7x7 stem) and
#: the epilogues they use: (residual, ReLU) = conv + BN + ReLU, the block end (+ shortcut, ReLU), downsample.
KERNEL_SIZES = (1, 3, 7)
EPILOGUES = ((False, True), (True, True), (False, False))


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every kernel size, epilogue and BLOCK_N choice, per dtype (stride,
    padding and dilation are runtime arguments)."""
    out = []
    ints = {name: "i32" for name in ("C", "H", "W", "O", "HO", "WO", "M", "stride", "padding", "dilation", "sx_n",
                                     "sx_c", "sx_h", "sx_w", "sw_o", "sw_c", "sw_h", "sw_w", "so_n", "so_c", "so_h",
                                     "so_w", "sr_n", "sr_c", "sr_h", "sr_w")}
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        for out_channels in sorted({_blocks(dtype, o)["BLOCK_N"]: o for o in (64, 256)}.values()):
            blocks = _blocks(dtype, out_channels)
            warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
            for k in KERNEL_SIZES:
                for has_res, relu in EPILOGUES:
                    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{acc}", "res_ptr": f"*{dt}",
                           "out_ptr": f"*{dt}", **ints}
                    consts = dict(KH=k, KW=k, HAS_BIAS=True, HAS_RES=has_res, RELU=relu, GROUP=GROUP_M,
                                  ACC_DTYPE=acc_tl(dtype), DOT_UPCAST=False, **blocks)
                    sig.update({name: "constexpr" for name in consts})
                    tag = ("res_" if has_res else "") + ("relu" if relu else "linear")
                    out.append((_conv_fwd_kernel, CompileConfig(
                        f"conv_fwd/{dt}/k{k}/n{blocks['BLOCK_N']}/{tag}", sig, consts, num_warps=warps,
                        num_stages=stages)))
    return out
