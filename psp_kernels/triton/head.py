"""Triton kernels of the concat-free head's epilogue (``psp::add_branch_bn_relu`` and its backward).

The branch term's last interpolation (along W), its add to the x-half conv output, BatchNorm and ReLU
(contract: ``psp_kernels.reference.add_branch_bn_relu``). In the kernels ``y`` is the conv output
(``conv_out``), ``u`` the branch rows (``branch_rows``), ``bw`` the W-axis interpolation weights
(``width_interp``) and ``z = y + u @ bw^T`` BatchNorm's input (``bn_input``). Per (n, o, h) row the branch
term is ``u[n, o, h, :] @ bw^T``, K = kw * sum(bins) (36 for semseg's head): each program owns one (n, h)
row and a block of BLOCK_O channels, holds its ``u`` tile [BLOCK_O, K] in registers, and walks the row in
BLOCK_W columns; the branch tile is one small ``tl.dot`` with ``bw``'s [BLOCK_W, K] tile, so neither the
full-resolution branch term nor the 2C-channel concat exists in memory.

===================  ============================================================  ========
function             passes                                                        launches
===================  ============================================================  ========
forward, eval        read y, u -> write out (and z when kept)                          1
forward, training    read y, u -> write z and per-row (mean, M2); merge rows in a     3-4
                     fixed order, two-level (Chan's formula, common.merge_tiles);
                     read z -> write out
backward             read g, z -> per-row (sum g', sum g' xhat); sum rows in a        3-4
                     fixed order, two-level (common.sum_rows); read g, z -> write
                     grad_y, and grad_u = grad_z @ bw per row
===================  ============================================================  ========

g' is the gradient behind the ReLU (mask ``z * scale + shift > 0``). Every output element is written by
one program reducing in a fixed order: bitwise deterministic, no atomics. Math in fp32 (fp64 for fp64). The
two dots (the branch term and grad_u) are the head's 3x3 branch conv, on accumulation-dtype operands: their
``DOT_PRECISION`` is :func:`~psp_kernels.triton.common.conv_dot_precision` of those operands, TF32 on a GPU
where eager cuDNN runs an fp32 conv in TF32 (16-bit heads included: eager runs their conv in 16 bits,
coarser than TF32), IEEE on the CPU and in fp64. ``KERNELS`` registration: :func:`compile_configs`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype
from .common import (BLOCK_ROWS, MERGE_BLOCK_T, CompileConfig, SIG_DTYPE, _merge_tiles_kernel, _sum_rows_kernel,
                     acc_tl, bn_vectors, conv_dot_precision, eps_args, merge_tiles, pow2, relu_nan, sum_rows)

BLOCK_O = 32         # channels per program
BLOCK_W = 32         # columns per step along the row (forward)
K_PADS = (16, 32, 64, 128)   # K padded to a power of two; semseg's head: K = 36 -> 64
NUM_WARPS = 4
BWD_BLOCK_W, BWD_NUM_WARPS = 16, 8   # the backward's two row passes: fewer registers a thread, more resident warps


@triton.jit
def _row_block(H, O, BLOCK_O: tl.constexpr):
    """Program -> (n, h, channel offsets, mask) of its (n, h) row and channel block."""
    row = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    return row // H, row % H, offs_o, offs_o < O


@triton.jit
def _row_base(n, h, s_n, s_h):
    """Offset of the (n, h) row of a 4-D tensor (int64: the tensor may hold 2**31 elements or more)."""
    return n.to(tl.int64) * s_n + h.to(tl.int64) * s_h


@triton.jit
def _tile(offs_o, offs_w, mask_o, W, s_o, s_w):
    """Offsets within its row (int32, see :func:`_check_row_offsets`) and mask of the [BLOCK_O, BLOCK_W] tile of a
    4-D tensor."""
    mask_w = offs_w < W
    return offs_o[:, None] * s_o + offs_w[None, :] * s_w, mask_o[:, None] & mask_w[None, :], mask_w


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _head_fwd_kernel(
    y_ptr,                        # [N, O, H, W] conv output, NCHW or channels_last
    u_ptr,                        # [N, O, H, K] contiguous, acc dtype
    bw_ptr,                       # [W, K] contiguous, acc dtype
    bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,   # [O] acc dtype (running statistics; unused in training)
    z_ptr, out_ptr,               # y's dtype and strides
    part_ptr,                     # [2, N*H, O] acc: per-row mean and M2 (training)
    stat_mean_ptr, stat_var_ptr,  # [O] acc: the running statistics copied out (eval)
    O, H, W, K, eps_hi, eps_lo,
    s_n, s_o, s_h, s_w,
    TRAINING: tl.constexpr, KEEP_Z: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, K_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n, h, offs_o, mask_o = _row_block(H, O, BLOCK_O)
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    u = tl.load(u_ptr + ((n * O + offs_o).to(tl.int64) * H + h)[:, None] * K + offs_k[None, :],
                mask=mask_o[:, None] & mask_k[None, :], other=0.0)
    if not TRAINING:
        invstd, scale, shift, mean = bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o,
                                                eps_hi, eps_lo, ACC_DTYPE)
        if tl.program_id(0) == 0:
            tl.store(stat_mean_ptr + offs_o, mean, mask=mask_o)
            tl.store(stat_var_ptr + offs_o, tl.load(var_ptr + offs_o, mask=mask_o), mask=mask_o)
    run_mean = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    run_m2 = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    base = _row_base(n, h, s_n, s_h)
    y_row, z_row, out_row = y_ptr + base, z_ptr + base, out_ptr + base
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        off, mask, mask_w = _tile(offs_o, offs_w, mask_o, W, s_o, s_w)
        bw = tl.load(bw_ptr + offs_w[:, None] * K + offs_k[None, :], mask=mask_w[:, None] & mask_k[None, :],
                     other=0.0)
        branch = tl.dot(u, tl.trans(bw), input_precision=DOT_PRECISION)
        y = tl.load(y_row + off, mask=mask, other=0.0).to(ACC_DTYPE)
        z = (y + branch).to(z_ptr.dtype.element_ty)
        if TRAINING or KEEP_Z:
            tl.store(z_row + off, z, mask=mask)
        zf = z.to(ACC_DTYPE)
        if TRAINING:
            # Chan's merge of this block's (count, mean, M2) into the row's, per channel.
            seen = tl.cast(w0, ACC_DTYPE)
            cnt = tl.cast(tl.minimum(W - w0, BLOCK_W), ACC_DTYPE)
            bmean = tl.sum(tl.where(mask, zf, 0.0), axis=1) / cnt
            d = tl.where(mask, zf - bmean[:, None], 0.0)
            delta = bmean - run_mean
            run_mean += delta * (cnt / (seen + cnt))
            run_m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * cnt / (seen + cnt))
        else:
            tl.store(out_row + off, relu_nan(zf * scale[:, None] + shift[:, None]).to(out_ptr.dtype.element_ty),
                     mask=mask)
    if TRAINING:
        rows = tl.num_programs(0)
        prow = part_ptr + tl.program_id(0).to(tl.int64) * O + offs_o
        tl.store(prow, run_mean, mask=mask_o)
        tl.store(prow + rows.to(tl.int64) * O, run_m2, mask=mask_o)


@triton.jit
def _head_norm_kernel(z_ptr, out_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, O, H, W, eps_hi, eps_lo,
                      s_n, s_o, s_h, s_w,
                      BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Training forward, last pass: out = relu(z * scale + shift) with the batch statistics."""
    n, h, offs_o, mask_o = _row_block(H, O, BLOCK_O)
    _invstd, scale, shift, _mean = bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o, eps_hi,
                                              eps_lo, ACC_DTYPE)
    base = _row_base(n, h, s_n, s_h)
    z_row, out_row = z_ptr + base, out_ptr + base
    for w0 in range(0, W, BLOCK_W):
        off, mask, _mask_w = _tile(offs_o, w0 + tl.arange(0, BLOCK_W), mask_o, W, s_o, s_w)
        zf = tl.load(z_row + off, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(out_row + off, relu_nan(zf * scale[:, None] + shift[:, None]).to(out_ptr.dtype.element_ty),
                 mask=mask)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _relu_grad(g_ptr, z_ptr, goff, zoff, mask, scale, shift, ACC_DTYPE: tl.constexpr):
    """(g', z) of a tile: the incoming gradient where the forward's pre-activation was > 0, else 0."""
    zf = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr + goff, mask=mask, other=0.0).to(ACC_DTYPE)
    return tl.where(zf * scale[:, None] + shift[:, None] > 0, g, 0.0), zf


@triton.jit
def _head_bwd_sums_kernel(g_ptr, z_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, part_ptr,
                          O, H, W, eps_hi, eps_lo,
                          sg_n, sg_o, sg_h, sg_w, s_n, s_o, s_h, s_w,
                          BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Per row: sum over w of g' * xhat and of g' -> part [2, N*H, O] (the row's grad_bn_weight, grad_bn_bias)."""
    n, h, offs_o, mask_o = _row_block(H, O, BLOCK_O)
    invstd, scale, shift, mean = bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o,
                                            eps_hi, eps_lo, ACC_DTYPE)
    g_row = g_ptr + _row_base(n, h, sg_n, sg_h)
    z_row = z_ptr + _row_base(n, h, s_n, s_h)
    sum_g = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    sum_gx = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        goff, mask, _ = _tile(offs_o, offs_w, mask_o, W, sg_o, sg_w)
        zoff, _, _ = _tile(offs_o, offs_w, mask_o, W, s_o, s_w)
        g, zf = _relu_grad(g_row, z_row, goff, zoff, mask, scale, shift, ACC_DTYPE)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * ((zf - mean[:, None]) * invstd[:, None]), axis=1)
    rows = tl.num_programs(0)
    prow = part_ptr + tl.program_id(0).to(tl.int64) * O + offs_o
    tl.store(prow, sum_gx, mask=mask_o)
    tl.store(prow + rows.to(tl.int64) * O, sum_g, mask=mask_o)


@triton.jit
def _head_bwd_kernel(g_ptr, z_ptr, bw_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, sums_ptr,
                     gy_ptr, gu_ptr, O, H, W, K, eps_hi, eps_lo,
                     sg_n, sg_o, sg_h, sg_w, s_n, s_o, s_h, s_w,
                     TRAINING: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr,
                     K_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """grad_z of the row's tile -> grad_y (z's strides); grad_u[n, o, h, :] = sum_w grad_z * bw[w, :]."""
    n, h, offs_o, mask_o = _row_block(H, O, BLOCK_O)
    invstd, scale, shift, mean = bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o,
                                            eps_hi, eps_lo, ACC_DTYPE)
    if TRAINING:
        count = tl.cast(tl.num_programs(0), ACC_DTYPE) * tl.cast(W, ACC_DTYPE)   # N*H*W
        mean_gx = tl.load(sums_ptr + offs_o, mask=mask_o, other=0.0) / count
        mean_g = tl.load(sums_ptr + O + offs_o, mask=mask_o, other=0.0) / count
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    g_row = g_ptr + _row_base(n, h, sg_n, sg_h)
    zbase = _row_base(n, h, s_n, s_h)
    z_row, gy_row = z_ptr + zbase, gy_ptr + zbase
    gu = tl.zeros([BLOCK_O, K_PAD], dtype=ACC_DTYPE)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        goff, mask, mask_w = _tile(offs_o, offs_w, mask_o, W, sg_o, sg_w)
        zoff, _, _ = _tile(offs_o, offs_w, mask_o, W, s_o, s_w)
        g, zf = _relu_grad(g_row, z_row, goff, zoff, mask, scale, shift, ACC_DTYPE)
        if TRAINING:
            xhat = (zf - mean[:, None]) * invstd[:, None]
            g = g - mean_g[:, None] - xhat * mean_gx[:, None]
        gz = tl.where(mask, g * scale[:, None], 0.0)
        tl.store(gy_row + zoff, gz.to(gy_ptr.dtype.element_ty), mask=mask)
        bw = tl.load(bw_ptr + offs_w[:, None] * K + offs_k[None, :], mask=mask_w[:, None] & mask_k[None, :],
                     other=0.0)
        gu = tl.dot(gz, bw, gu, input_precision=DOT_PRECISION)
    tl.store(gu_ptr + ((n * O + offs_o).to(tl.int64) * H + h)[:, None] * K + offs_k[None, :], gu,
             mask=mask_o[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _bn_args(bn_weight, bn_bias, mean, var, acc: torch.dtype):
    return [t.to(acc).contiguous() for t in (bn_weight, bn_bias, mean, var)]


def _k_pad(k: int) -> int:
    pad = pow2(k)
    if pad not in K_PADS:
        raise ValueError(f"branch_rows' last dim K = {k} is above the largest supported {K_PADS[-1]} (kw * sum(bins))")
    return pad


def _grid(n: int, o: int, h: int) -> tuple[int, int]:
    return (n * h, triton.cdiv(o, BLOCK_O))


def _check_row_offsets(*tensors: torch.Tensor) -> None:
    """The kernels address a tile within its (n, h) row in int32 (:func:`_tile`; the row's offset is int64)."""
    for t in tensors:
        _, o, _, w = t.shape
        if (o - 1) * t.stride(1) + (w - 1) * t.stride(3) >= 2 ** 31:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} has in-row offsets "
                             "of 2**31 elements or more")


def add_branch_bn_relu(conv_out: torch.Tensor, branch_rows: torch.Tensor, width_interp: torch.Tensor,
                       bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor, training: bool, eps: float, keep_bn_input: bool):
    """Contract of ``psp_kernels.reference.add_branch_bn_relu``: returns ``(out, bn_input, mean, var)``."""
    y, u, bw, keep_z = conv_out, branch_rows, width_interp, keep_bn_input
    n, o, h, w = y.shape
    _check_row_offsets(y)                   # z and out: empty_like(y), y's strides
    k = u.shape[-1]
    acc = acc_dtype(y.dtype)
    tacc = acc_tl(y.dtype)
    out = torch.empty_like(y)
    z = torch.empty_like(y) if training or keep_z else y.new_empty(0)
    mean = torch.empty(o, dtype=acc, device=y.device)
    var = torch.empty(o, dtype=acc, device=y.device)
    bn = _bn_args(bn_weight, bn_bias, running_mean, running_var, acc)
    part = torch.empty(2, n * h, o, dtype=acc, device=y.device) if training else mean
    hi, lo = eps_args(eps)
    strides = y.stride()
    _head_fwd_kernel[_grid(n, o, h)](
        y, u, bw, *bn, z if z.numel() else out, out, part, mean, var, o, h, w, k, hi, lo, *strides,
        TRAINING=training, KEEP_Z=keep_z, BLOCK_O=BLOCK_O, BLOCK_W=BLOCK_W, K_PAD=_k_pad(k), ACC_DTYPE=tacc,
        DOT_PRECISION=conv_dot_precision(u.dtype, u.device), num_warps=NUM_WARPS)
    if training:
        mean, var = merge_tiles(part, n * h * w, w, BLOCK_O, NUM_WARPS)      # per image row (mean, M2) of W
        _head_norm_kernel[_grid(n, o, h)](z, out, bn[0], bn[1], mean, var, o, h, w, hi, lo, *strides,
                                          BLOCK_O=BLOCK_O, BLOCK_W=BLOCK_W, ACC_DTYPE=tacc, num_warps=NUM_WARPS)
    return out, z, mean, var


def add_branch_bn_relu_backward(grad_out: torch.Tensor, bn_input: torch.Tensor, width_interp: torch.Tensor,
                                bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                                training: bool, eps: float):
    """Contract of ``psp_kernels.reference.add_branch_bn_relu_backward``: ``(grad_conv_out, grad_branch_rows,
    grad_bn)``."""
    z, bw = bn_input, width_interp
    n, o, h, w = z.shape
    _check_row_offsets(grad_out, z)         # grad_y: empty_like(z)
    k = bw.shape[1]
    acc = acc_dtype(z.dtype)
    tacc = acc_tl(z.dtype)
    bn_weight, bn_bias, mean, var = _bn_args(bn_weight, bn_bias, mean, var, acc)
    hi, lo = eps_args(eps)
    part = torch.empty(2, n * h, o, dtype=acc, device=z.device)
    sums = torch.empty(2, o, dtype=acc, device=z.device)
    strides = (*grad_out.stride(), *z.stride())
    _head_bwd_sums_kernel[_grid(n, o, h)](grad_out, z, bn_weight, bn_bias, mean, var, part, o, h, w, hi, lo, *strides,
                                          BLOCK_O=BLOCK_O, BLOCK_W=BWD_BLOCK_W, ACC_DTYPE=tacc,
                                          num_warps=BWD_NUM_WARPS)
    sum_rows(part, sums, BLOCK_O, NUM_WARPS)
    grad_y = torch.empty_like(z)
    grad_u = torch.empty(n, o, h, k, dtype=acc, device=z.device)
    _head_bwd_kernel[_grid(n, o, h)](grad_out, z, bw, bn_weight, bn_bias, mean, var, sums, grad_y, grad_u,
                                     o, h, w, k, hi, lo, *strides, TRAINING=training, BLOCK_O=BLOCK_O,
                                     BLOCK_W=BWD_BLOCK_W, K_PAD=_k_pad(k), ACC_DTYPE=tacc,
                                     DOT_PRECISION=conv_dot_precision(bw.dtype, bw.device), num_warps=BWD_NUM_WARPS)
    return grad_y, grad_u, sums


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every specialisation the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        tacc = acc_tl(dtype)
        ints = lambda *names: {name: "i32" for name in names}  # noqa: E731
        bn = {"bn_weight_ptr": f"*{acc}", "bn_bias_ptr": f"*{acc}", "mean_ptr": f"*{acc}", "var_ptr": f"*{acc}"}
        eps = {"eps_hi": "fp32", "eps_lo": "fp32"}
        zs = ints("s_n", "s_o", "s_h", "s_w")
        gs = ints("sg_n", "sg_o", "sg_h", "sg_w")
        blocks = dict(BLOCK_O=BLOCK_O, BLOCK_W=BLOCK_W, ACC_DTYPE=tacc)
        bwd_blocks = dict(blocks, BLOCK_W=BWD_BLOCK_W)
        precision = "ieee" if dtype == torch.float64 else "tf32"    # a GPU launch's default (conv_dot_precision)
        for k_pad in K_PADS:
            for training, keep_z in ((True, True), (False, False), (False, True)):
                out.append((_head_fwd_kernel, CompileConfig(
                    f"head_fwd/{dt}/k{k_pad}/{'train' if training else 'eval'}{'_z' if keep_z else ''}",
                    {"y_ptr": f"*{dt}", "u_ptr": f"*{acc}", "bw_ptr": f"*{acc}", **bn, "z_ptr": f"*{dt}",
                     "out_ptr": f"*{dt}", "part_ptr": f"*{acc}", "stat_mean_ptr": f"*{acc}",
                     "stat_var_ptr": f"*{acc}", **ints("O", "H", "W", "K"), **eps, **zs,
                     "TRAINING": "constexpr", "KEEP_Z": "constexpr", "BLOCK_O": "constexpr",
                     "BLOCK_W": "constexpr", "K_PAD": "constexpr", "ACC_DTYPE": "constexpr",
                     "DOT_PRECISION": "constexpr"},
                    dict(TRAINING=training, KEEP_Z=keep_z, K_PAD=k_pad, DOT_PRECISION=precision, **blocks),
                    num_warps=NUM_WARPS)))
            for training in (True, False):
                out.append((_head_bwd_kernel, CompileConfig(
                    f"head_bwd/{dt}/k{k_pad}/{'train' if training else 'eval'}",
                    {"g_ptr": f"*{dt}", "z_ptr": f"*{dt}", "bw_ptr": f"*{acc}", **bn, "sums_ptr": f"*{acc}",
                     "gy_ptr": f"*{dt}", "gu_ptr": f"*{acc}", **ints("O", "H", "W", "K"), **eps, **gs, **zs,
                     "TRAINING": "constexpr", "BLOCK_O": "constexpr", "BLOCK_W": "constexpr",
                     "K_PAD": "constexpr", "ACC_DTYPE": "constexpr", "DOT_PRECISION": "constexpr"},
                    dict(TRAINING=training, K_PAD=k_pad, DOT_PRECISION=precision, **bwd_blocks),
                    num_warps=BWD_NUM_WARPS)))
        out.append((_head_norm_kernel, CompileConfig(
            f"head_norm/{dt}", {"z_ptr": f"*{dt}", "out_ptr": f"*{dt}", **bn, **ints("O", "H", "W"), **eps, **zs,
                                "BLOCK_O": "constexpr", "BLOCK_W": "constexpr", "ACC_DTYPE": "constexpr"},
            blocks, num_warps=NUM_WARPS)))
        out.append((_head_bwd_sums_kernel, CompileConfig(
            f"head_bwd_sums/{dt}", {"g_ptr": f"*{dt}", "z_ptr": f"*{dt}", **bn, "part_ptr": f"*{acc}",
                                    **ints("O", "H", "W"), **eps, **gs, **zs,
                                    "BLOCK_O": "constexpr", "BLOCK_W": "constexpr", "ACC_DTYPE": "constexpr"},
            bwd_blocks, num_warps=BWD_NUM_WARPS)))
        if dtype not in (torch.float32, torch.float64):
            continue                    # the merge kernels see only accumulation-dtype partials
        reduce_consts = dict(BLOCK_O=BLOCK_O, BLOCK_ROWS=BLOCK_ROWS, ACC_DTYPE=tacc)
        out.append((_merge_tiles_kernel, CompileConfig(
            f"head_merge_tiles/{dt}", {"part_ptr": f"*{acc}", "mean_ptr": f"*{acc}", "m2_ptr": f"*{acc}",
                                       **ints("TILES", "O", "M", "TILE_PIXELS", "TILES_PER_PROGRAM", "M2_DIVISOR"),
                                       "BLOCK_T": "constexpr", "BLOCK_O": "constexpr", "ACC_DTYPE": "constexpr"},
            dict(BLOCK_T=MERGE_BLOCK_T, BLOCK_O=BLOCK_O, ACC_DTYPE=tacc), num_warps=NUM_WARPS)))
        out.append((_sum_rows_kernel, CompileConfig(
            f"head_sum_rows/{dt}", {"part_ptr": f"*{acc}", "out_ptr": f"*{acc}", **ints("ROWS", "O"),
                                    "BLOCK_O": "constexpr", "BLOCK_ROWS": "constexpr", "ACC_DTYPE": "constexpr"},
            reduce_consts, num_warps=NUM_WARPS)))
    return out
