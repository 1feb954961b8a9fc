"""Triton kernels of every bin's 1x1 reduction conv + BatchNorm + ReLU (``psp::reduction_conv_bn_relu`` and its
backward).

Per bin k the packed tensors are GEMM operands without any copy: with ``bb = b_k**2`` and row index
``m = n*bb + s`` (``M_k = N*bb`` rows), ``P_k[m, c] = pooled[n, c, off_k + s]`` and
``Z_k[m, r] = z[n, r, off_k + s]``; ``Z_k = P_k @ W_k^T`` with ``W_k`` [R, C].

The per-bin parameters arrive as lists; the launchers pack them with one ``torch.cat`` (one launch)
into a flat buffer viewed as weights [nb, R, C] and BN vectors [4, nb, R], so one kernel covers every
bin: the eval forward of the whole PPM is then 4 launches (pool, pack, reduction, upsample).

The rows of every bin are cut into row tiles of BLOCK_M rows (the last one of a bin partial), numbered bin
after bin (:func:`_row_tile`); the row-parallel kernels run one program per (row tile, channel block), so the
grid grows with N instead of one program looping over a bin's N*b*b rows. Statistics over a bin's rows are
per-tile partials merged in tile order by every program that needs them: bitwise deterministic, no atomics.

Forward, one launch in eval, two in training:
  1. ``_reduction_fwd_kernel`` (row tile, R block): GEMM -> z; eval: BatchNorm (running statistics) + ReLU
     -> out; training: the tile's per-channel (mean, M2) -> [2, tiles, R] partials.
  2. ``_reduction_bn_act_kernel`` (training; row tile, R block): the bin's partials merged in tile order
     (Chan) -> batch mean and biased variance; BatchNorm + ReLU of the tile's z -> out.

Backward, four launches:
  1. ``_bn_bwd_kernel`` PASS 1 (row tile, R block): per-tile sum g and sum g*xhat -> partials.
  2. ``_bn_bwd_kernel`` PASS 2 (row tile, R block): the bin's partials summed in tile order -> grad_bn_bias,
     grad_bn_weight; dz of the tile (fp32/fp64 scratch).
  3. ``_dgrad_kernel``  (row tile, C block): grad_pooled = dz @ W_k  (K = R).
  4. ``_wgrad_kernel``  (bin, R block, C block): grad_W_k = dz^T @ P_k  (K = M_k, fixed order).

Dot precision (``DOT_PRECISION``, :func:`_dot_precision`): the dots are the 1x1 conv's products. fp32 pooled:
TF32 exactly when eager cuDNN would (:func:`~psp_kernels.triton.common.conv_dot_precision`). 16-bit pooled:
the dots with fp32 operands (AMP's fp32 weights in the forward, the fp32 dz in the backward) run on a GPU as
``tf32x3`` -- three TF32 tensor-core products, about fp32-accurate -- where the contract keeps the result in
fp32 computed from fp32 operands (bn_input, the weight gradient; ``psp_kernels.reference``), and as TF32 where
it is rounded to pooled's dtype (grad_pooled: TF32 operands keep fp16's 10-bit mantissa, no coarser than the
operands of eager autocast's 16-bit conv); 16-bit x 16-bit dots (exact products, fp32 accumulation) ignore it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets
from ..table_cache import cached_table
from .common import CompileConfig, SIG_DTYPE, acc_tl, conv_dot_precision, dot_upcast, eps_args, inv_std, relu_nan

BLOCK_T = tl.constexpr(16)       # row tiles' partials per step of the ordered merges


def _bin_table(bins: Sequence[int], device: torch.device) -> torch.Tensor:
    """i32 [2, nb]: bin sizes and packed offsets (cached per device)."""
    return cached_table(("bins", tuple(bins), str(device)), lambda: torch.tensor(
        [list(bins), list(bin_offsets(bins))], dtype=torch.int32, device=device))


def _pack_params(weights, bn_weights, bn_biases, means, variances, dtype: torch.dtype):
    """Every bin's conv weight and BN vectors in one flat buffer, one ``torch.cat`` launch; returns the views
    ``(w [nb, R, C], bn [4, nb, R] = bn_weight, bn_bias, mean, var)``.

    The buffer keeps the parameters' dtype (promoted across them) when that is the activations' dtype or
    the accumulation dtype (fp16/bf16 products are exact in fp32, so tensor cores match the fp32
    reference math); any other mix is converted to the accumulation dtype.
    """
    nb, (r, c) = len(weights), weights[0].shape[:2]
    flat = torch.cat([t.reshape(-1) for t in (*weights, *bn_weights, *bn_biases, *means, *variances)])
    if flat.dtype not in (dtype, acc_dtype(dtype)):
        flat = flat.to(acc_dtype(dtype))
    return flat[:nb * r * c].view(nb, r, c), flat[nb * r * c:].view(4, nb, r)


def _dot_precision(pooled: torch.Tensor, fp32_result: bool) -> str:
    """``DOT_PRECISION`` of a launch on ``pooled`` (module docstring): fp32 / fp64 pooled:
    :func:`~psp_kernels.triton.common.conv_dot_precision`; 16-bit pooled on a GPU: ``"tf32x3"`` for a dot whose
    result is kept in fp32 (``fp32_result``), ``"tf32"`` for one rounded to pooled's dtype."""
    if pooled.dtype in (torch.float16, torch.bfloat16) and pooled.device.type != "cpu":
        return "tf32x3" if fp32_result else "tf32"
    return conv_dot_precision(pooled.dtype, pooled.device)


def _row_tiles(n: int, bins: Sequence[int], block_m: int) -> int:
    """Number of row tiles over all bins (:func:`_row_tile`)."""
    return sum(triton.cdiv(n * b * b, block_m) for b in bins)


@triton.jit
def _row_tile(N, bin_ptr, NB: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program -> its row tile ``tl.program_id(0)``: (bin k, packed offset, bin size squared bb, M_k, the tile's
    row offsets and mask, the bin's first tile, the bin's tile count). Tiles are numbered bin after bin,
    ``cdiv(M_k, BLOCK_M)`` per bin."""
    t = tl.program_id(0)
    k = 0
    bb = 0
    first = 0
    count = 0
    start = 0
    for j in tl.static_range(NB):
        b_j = tl.load(bin_ptr + j)
        n_j = tl.cdiv(N * b_j * b_j, BLOCK_M)
        here = (t >= start) & (t < start + n_j)
        k = tl.where(here, j, k)
        bb = tl.where(here, b_j * b_j, bb)
        first = tl.where(here, start, first)
        count = tl.where(here, n_j, count)
        start += n_j
    M = N * bb
    offs_m = (t - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    return k, tl.load(bin_ptr + NB + k), bb, M, offs_m, offs_m < M, first, count


@triton.jit
def _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Bin k's (bn_weight, bn_bias, mean, var) of the packed BN buffer, and eps, in the accumulation dtype."""
    bn_weight = tl.load(bn_ptr + k * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    bn_bias = tl.load(bn_ptr + (NB + k) * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    mean = tl.load(bn_ptr + (2 * NB + k) * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    var = tl.load(bn_ptr + (3 * NB + k) * R + offs_r, mask=mask_r, other=1.0).to(ACC_DTYPE)
    return bn_weight, bn_bias, mean, var, tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)


@triton.jit
def _partial_offsets(first, i0, count, R, offs_r, mask_r, BLOCK_T: tl.constexpr):
    """Offsets and mask, in one half of a [2, tiles, R] partials buffer, of a bin's tiles i0 .. i0 + BLOCK_T - 1
    (those from ``count`` on masked; the bin's tile i is tile ``first + i``), and those indices i and their mask."""
    offs_i = i0 + tl.arange(0, BLOCK_T)
    mask_i = offs_i < count
    off = (first + offs_i).to(tl.int64)[:, None] * R + offs_r[None, :]
    return off, mask_i[:, None] & mask_r[None, :], offs_i, mask_i


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _conv_tile(p_ptr, w_ptr, k, n_idx, s_idx, mask_m, offs_r, mask_r, C, R, S,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
               DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The [BLOCK_M, BLOCK_R] tile of ``Z_k = P_k @ W_k^T`` at rows (n_idx, s_idx), channels offs_r: C ascending
    in BLOCK_K steps."""
    p_rows = p_ptr + n_idx.to(tl.int64) * C * S + s_idx                    # P_k[m, 0]
    w_rows = w_ptr + (k * R + offs_r).to(tl.int64) * C                     # W_k[r, 0]
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_K):
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        a = tl.load(p_rows[:, None] + offs_k[None, :] * S, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_rows[None, :] + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_UPCAST:
            a = a.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _merged_stats(part_ptr, T, R, first, count, M, offs_r, mask_r, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_T: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Batch mean and biased variance of a bin's channels from its row tiles' (mean, M2): BLOCK_T tiles at a
    time (their combined mean and M2), merged in tile order (Chan et al.)."""
    run_mean = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    run_m2 = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for i0 in range(0, count, BLOCK_T):
        off, mask, offs_i, mask_i = _partial_offsets(first, i0, count, R, offs_r, mask_r, BLOCK_T)
        cnt = tl.where(mask_i, tl.minimum(M - offs_i * BLOCK_M, BLOCK_M), 0).to(ACC_DTYPE)[:, None]
        means = tl.load(part_ptr + off, mask=mask, other=0.0)
        m2s = tl.load(part_ptr + tl.cast(T, tl.int64) * R + off, mask=mask, other=0.0)
        n_blk = tl.sum(cnt, axis=0)
        bmean = tl.sum(cnt * means, axis=0) / n_blk
        d = means - bmean[None, :]
        bm2 = tl.sum(m2s, axis=0) + tl.sum(cnt * d * d, axis=0)
        seen = tl.cast(i0 * BLOCK_M, ACC_DTYPE)
        delta = bmean - run_mean
        run_mean += delta * (n_blk / (seen + n_blk))
        run_m2 += bm2 + delta * delta * (seen * n_blk / (seen + n_blk))
    return run_mean, run_m2 / tl.cast(M, ACC_DTYPE)


@triton.jit
def _reduction_fwd_kernel(
    p_ptr,                      # pooled [N, C, S] contiguous
    w_ptr,                      # weights [nb, R, C] contiguous (x dtype or acc dtype)
    bn_ptr,                     # [4, nb, R] (bn_weight, bn_bias, running mean, running var), w's dtype
    bin_ptr,                    # i32 [2, nb]: size, packed offset
    out_ptr,                    # [N, R, S] pooled dtype (eval)
    z_ptr,                      # [N, R, S] acc dtype
    part_ptr,                   # [2, T, R] acc: per row tile (mean, M2) of z (training)
    mean_ptr, var_ptr,          # [nb, R] acc dtype: the running statistics copied out (eval)
    N, C, R, S, T, eps_hi, eps_lo,  # T row tiles; eps = eps_hi + eps_lo (fp32 arguments, see eps_args)
    NB: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Decomposition: program (row tile, block of BLOCK_R channels) runs the tile's GEMM and stores z; eval:
    # BatchNorm (running statistics) + ReLU -> out; training: the tile's per-channel mean and centred sum
    # of squares -> part (_reduction_bn_act_kernel merges them and normalises).
    k, off, bb, M, offs_m, mask_m, first, _count = _row_tile(N, bin_ptr, NB, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    n_idx = offs_m // bb
    s_idx = off + offs_m % bb
    zt = _conv_tile(p_ptr, w_ptr, k, n_idx, s_idx, mask_m, offs_r, mask_r, C, R, S,
                    BLOCK_M, BLOCK_R, BLOCK_K, ACC_DTYPE, DOT_UPCAST, DOT_PRECISION)
    z_off = (n_idx.to(tl.int64) * R * S + s_idx)[:, None] + offs_r[None, :] * S
    mask_mr = mask_m[:, None] & mask_r[None, :]
    tl.store(z_ptr + z_off, zt, mask=mask_mr)
    t = tl.program_id(0)
    if TRAINING:
        cnt = tl.cast(tl.minimum(M - (t - first) * BLOCK_M, BLOCK_M), ACC_DTYPE)
        tile_mean = tl.sum(zt, axis=0) / cnt                    # rows past M_k are exact zeros
        d = tl.where(mask_m[:, None], zt - tile_mean[None, :], 0.0)
        prow = part_ptr + t.to(tl.int64) * R + offs_r
        tl.store(prow, tile_mean, mask=mask_r)
        tl.store(prow + tl.cast(T, tl.int64) * R, tl.sum(d * d, axis=0), mask=mask_r)
    else:
        bn_weight, bn_bias, mean, var, eps = _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB, ACC_DTYPE)
        scale = bn_weight * inv_std(var, eps, ACC_DTYPE)
        shift = bn_bias - mean * scale
        tl.store(out_ptr + z_off, relu_nan(zt * scale[None, :] + shift[None, :]).to(out_ptr.dtype.element_ty),
                 mask=mask_mr)
        if t == first:
            tl.store(mean_ptr + k * R + offs_r, mean, mask=mask_r)
            tl.store(var_ptr + k * R + offs_r, var, mask=mask_r)


@triton.jit
def _reduction_bn_act_kernel(
    z_ptr,                      # [N, R, S] acc dtype: the forward GEMM's output
    bn_ptr,                     # [4, nb, R] as _reduction_fwd_kernel's
    bin_ptr,                    # i32 [2, nb]
    part_ptr,                   # [2, T, R] acc: per row tile (mean, M2) of z
    out_ptr,                    # out: [N, R, S] pooled dtype
    mean_ptr, var_ptr,          # out: [nb, R] acc dtype: the batch statistics
    N, R, S, T, eps_hi, eps_lo,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: program (row tile, block of BLOCK_R channels), the training forward's second pass: the
    # bin's tile partials merged in tile order (every program of the bin merges the same partials the same
    # way; the bin's first tile stores the statistics), then BatchNorm + ReLU of the tile's z.
    k, off, bb, M, offs_m, mask_m, first, count = _row_tile(N, bin_ptr, NB, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mean, var = _merged_stats(part_ptr, T, R, first, count, M, offs_r, mask_r, BLOCK_M, BLOCK_R, BLOCK_T, ACC_DTYPE)
    if tl.program_id(0) == first:
        tl.store(mean_ptr + k * R + offs_r, mean, mask=mask_r)
        tl.store(var_ptr + k * R + offs_r, var, mask=mask_r)
    bn_weight, bn_bias, _mean, _var, eps = _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB, ACC_DTYPE)
    scale = bn_weight * inv_std(var, eps, ACC_DTYPE)
    shift = bn_bias - mean * scale
    z_off = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
    mask_mr = mask_m[:, None] & mask_r[None, :]
    zt = tl.load(z_ptr + z_off, mask=mask_mr, other=0.0)
    tl.store(out_ptr + z_off, relu_nan(zt * scale[None, :] + shift[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask_mr)


# Block configs. Forward: (BLOCK_M, BLOCK_R, BLOCK_K, num_warps of the GEMM, num_warps of the training BN +
# ReLU pass). Backward: per kernel, bn = (BLOCK_M, BLOCK_R, num_warps), dgrad = (BLOCK_M, BLOCK_C, BLOCK_K,
# num_warps), wgrad = (BLOCK_R, BLOCK_C, BLOCK_K, num_warps). "small" serves fp64 and tiny problems; the compile
# test builds every entry. The row-streaming passes run more warps than their tiles' GEMMs: fewer registers a
# thread, more resident warps.
REDUCTION_FWD_CONFIGS = {"big": (64, 32, 16, 4, 8), "small": (16, 16, 32, 4, 4)}
REDUCTION_BWD_CONFIGS = {
    "big": dict(bn=(64, 32, 8), dgrad=(64, 64, 32, 8), wgrad=(64, 64, 16, 8)),
    "small": dict(bn=(16, 16, 4), dgrad=(16, 32, 16, 4), wgrad=(16, 32, 16, 4)),
}


def _reduction_config(dtype: torch.dtype, m_max: int, r: int, c: int) -> str:
    if dtype == torch.float64 or m_max < 64 or r < 64 or c < 64:
        return "small"
    return "big"


def launcher_configs(dtype: torch.dtype) -> tuple[str, ...]:
    """Config names the launchers can pick for ``dtype`` (fp64 always runs "small")."""
    return ("small",) if dtype == torch.float64 else ("big", "small")


def reduction_conv_bn_relu(pooled: torch.Tensor, conv_weights: Sequence[torch.Tensor],
                           bn_weights: Sequence[torch.Tensor], bn_biases: Sequence[torch.Tensor],
                           running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                           bins: Sequence[int], training: bool, eps: float, *, config: str | None = None):
    """Per bin: 1x1 reduction conv (no bias) + BatchNorm + ReLU on the packed pooled tensor, one launch (two in
    training).

    Args:
        pooled: [N, C, S] contiguous, fp16/bf16/fp32/fp64.
        conv_weights: per bin [R, C, 1, 1] (pooled's dtype or fp32); bn_weights/bn_biases/running_*: per bin [R].
        training: batch statistics (biased variance over N*b*b rows) instead of the running ones.
        config: force a ``REDUCTION_FWD_CONFIGS`` entry (tests, tuning); default: heuristic.
    Returns:
        ``(out [N, R, S] pooled.dtype, bn_input [N, R, S] acc, mean [nb, R] acc, var [nb, R] acc)`` as
        :func:`psp_kernels.reference.reduction_conv_bn_relu`; running statistics are not modified.
    """
    n, c, s = pooled.shape
    assert pooled.is_contiguous()
    nb, r = len(bins), conv_weights[0].shape[0]
    dt = acc_dtype(pooled.dtype)
    dev = pooled.device
    w, bn = _pack_params(conv_weights, bn_weights, bn_biases, running_means, running_vars, pooled.dtype)
    out = torch.empty(n, r, s, dtype=pooled.dtype, device=dev)
    z = torch.empty(n, r, s, dtype=dt, device=dev)
    mean = torch.empty(nb, r, dtype=dt, device=dev)
    var = torch.empty(nb, r, dtype=dt, device=dev)
    config = config or _reduction_config(pooled.dtype, n * max(bins) ** 2, r, c)
    bm, br, bk, nw, nw_bn = REDUCTION_FWD_CONFIGS[config]
    tiles = _row_tiles(n, bins, bm)
    grid = (tiles, triton.cdiv(r, br))
    bins_t = _bin_table(bins, dev)
    hi, lo = eps_args(eps)
    acc = acc_tl(pooled.dtype)
    part = torch.empty(2, tiles, r, dtype=dt, device=dev) if training else mean
    _reduction_fwd_kernel[grid](
        pooled, w, bn, bins_t, out, z, part, mean, var, n, c, r, s, tiles, hi, lo,
        NB=nb, TRAINING=bool(training), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, ACC_DTYPE=acc,
        DOT_UPCAST=dot_upcast(w.dtype), DOT_PRECISION=_dot_precision(pooled, True), num_warps=nw)
    if training:
        _reduction_bn_act_kernel[grid](z, bn, bins_t, part, out, mean, var, n, r, s, tiles, hi, lo,
                                       NB=nb, BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=acc, num_warps=nw_bn)
    return out, z, mean, var


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _bn_bwd_kernel(
    go_ptr,                     # grad_out [N, R, S] contiguous (pooled dtype)
    z_ptr,                      # [N, R, S] acc
    bn_ptr,                     # acc [4, nb, R] (bn_weight, bn_bias, mean, var): the statistics the forward used
    bin_ptr,                    # i32 [2, nb]
    dz_ptr,                     # out: [N, R, S] acc scratch (dL/dz)
    part_ptr,                   # [2, T, R] acc: per row tile sum g, sum g*xhat
    grad_bn_weight_ptr, grad_bn_bias_ptr,      # out: [nb, R] acc
    N, R, S, T, eps_hi, eps_lo,
    NB: tl.constexpr, TRAINING: tl.constexpr, PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: program (row tile, block of BLOCK_R channels). PASS 1 stores the tile's sum g and sum
    # g*xhat (g = grad_out masked by ReLU); PASS 2 sums the bin's partials in tile order (grad_bn_bias,
    # grad_bn_weight, stored by the bin's first tile) and writes the tile's dz.
    k, off, bb, M, offs_m, mask_m, first, count = _row_tile(N, bin_ptr, NB, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    t = tl.program_id(0)
    if PASS == 2:
        grad_bn_bias = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        grad_bn_weight = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        for i0 in range(0, count, BLOCK_T):
            poff, pmask, _, _ = _partial_offsets(first, i0, count, R, offs_r, mask_r, BLOCK_T)
            grad_bn_bias += tl.sum(tl.load(part_ptr + poff, mask=pmask, other=0.0), axis=0)
            grad_bn_weight += tl.sum(tl.load(part_ptr + tl.cast(T, tl.int64) * R + poff, mask=pmask, other=0.0),
                                     axis=0)
        if t == first:
            tl.store(grad_bn_bias_ptr + k * R + offs_r, grad_bn_bias, mask=mask_r)
            tl.store(grad_bn_weight_ptr + k * R + offs_r, grad_bn_weight, mask=mask_r)
    bn_weight, bn_bias, mean, var, eps = _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB, ACC_DTYPE)
    invstd = inv_std(var, eps, ACC_DTYPE)
    scale = bn_weight * invstd
    shift = bn_bias - mean * scale
    off_mr = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
    mask_mr = mask_m[:, None] & mask_r[None, :]
    zt = tl.load(z_ptr + off_mr, mask=mask_mr, other=0.0)
    go = tl.load(go_ptr + off_mr, mask=mask_mr, other=0.0).to(ACC_DTYPE)
    g = tl.where(zt * scale[None, :] + shift[None, :] > 0, go, 0.0)      # masked rows: exact zeros
    xhat = (zt - mean[None, :]) * invstd[None, :]
    if PASS == 1:
        prow = part_ptr + t.to(tl.int64) * R + offs_r
        tl.store(prow, tl.sum(g, axis=0), mask=mask_r)
        tl.store(prow + tl.cast(T, tl.int64) * R, tl.sum(g * xhat, axis=0), mask=mask_r)
    else:
        if TRAINING:
            m_acc = tl.cast(M, ACC_DTYPE)
            dz = scale[None, :] * (g - (grad_bn_bias / m_acc)[None, :] - xhat * (grad_bn_weight / m_acc)[None, :])
        else:
            dz = g * scale[None, :]
        tl.store(dz_ptr + off_mr, dz, mask=mask_mr)


@triton.jit
def _dgrad_kernel(
    dz_ptr,                     # [N, R, S] acc
    w_ptr,                      # [nb, R, C] acc
    bin_ptr,                    # i32 [2, nb]
    gp_ptr,                     # out: grad_pooled [N, C, S] pooled dtype
    N, C, R, S,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Decomposition: program (row tile, C block) computes grad_pooled[m, c] = sum_r dz[m, r] * W_k[r, c] over
    # its tile. Every grad_pooled element belongs to exactly one bin's row, hence one program.
    k, off, bb, M, offs_m, mask_m, _first, _count = _row_tile(N, bin_ptr, NB, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    n_idx = (offs_m // bb).to(tl.int64)
    s_idx = off + offs_m % bb
    dz_rows = dz_ptr + n_idx * R * S + s_idx                                # dz_k[m, 0]
    w_cols = w_ptr + k.to(tl.int64) * R * C + offs_c                        # W_k[0, c]
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_K):
        offs_k = r0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < R
        a = tl.load(dz_rows[:, None] + offs_k[None, :] * S, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + offs_k[:, None].to(tl.int64) * C, mask=mask_k[:, None] & mask_c[None, :],
                     other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)
    tl.store(gp_ptr + (n_idx * C * S + s_idx)[:, None] + offs_c[None, :] * S,
             acc.to(gp_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_kernel(
    dz_ptr,                     # [N, R, S] acc
    p_ptr,                      # pooled [N, C, S]
    bin_ptr,                    # i32 [2, nb]
    gw_ptr,                     # out: [nb, R, C] acc
    N, C, R, S,
    NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Decomposition: program (bin k, R block, C block) reduces grad_W_k[r, c] = sum_m dz[m, r] P_k[m, c]
    # over all M_k rows in BLOCK_K steps (fixed order, no split-K).
    pid = tl.program_id(0)
    n_rblocks = tl.cdiv(R, BLOCK_R)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    k = pid // (n_rblocks * n_cblocks)
    offs_r = ((pid // n_cblocks) % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    b = tl.load(bin_ptr + k)
    off = tl.load(bin_ptr + NB + k)
    bb = b * b
    M = N * bb
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        n_idx = (offs_m // bb).to(tl.int64)
        s_idx = off + offs_m % bb
        a = tl.load(dz_ptr + (n_idx * R * S + s_idx)[None, :] + offs_r[:, None] * S,
                    mask=mask_r[:, None] & mask_m[None, :], other=0.0)                  # dz^T [R, M]
        p = tl.load(p_ptr + (n_idx * C * S + s_idx)[:, None] + offs_c[None, :] * S,
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)                  # P_k [M, C]
        acc = tl.dot(a, p.to(ACC_DTYPE), acc, input_precision=DOT_PRECISION)
    tl.store(gw_ptr + (k * R + offs_r).to(tl.int64)[:, None] * C + offs_c[None, :], acc,
             mask=mask_r[:, None] & mask_c[None, :])


def reduction_conv_bn_relu_backward(grad_out: torch.Tensor, pooled: torch.Tensor, bn_input: torch.Tensor,
                                    conv_weights: Sequence[torch.Tensor], bn_weights: Sequence[torch.Tensor],
                                    bn_biases: Sequence[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                                    bins: Sequence[int], training: bool, eps: float, *, config: str | None = None):
    """Gradient of :func:`reduction_conv_bn_relu` w.r.t. pooled, the conv weights, bn_weights and bn_biases.

    Args:
        grad_out: [N, R, S] contiguous; pooled [N, C, S] contiguous; bn_input [N, R, S] acc dtype;
        mean/var: [nb, R] acc dtype (the statistics the forward used).
        config: force a ``REDUCTION_BWD_CONFIGS`` entry (tests, tuning); default: heuristic.
    Returns:
        ``(grad_pooled [N, C, S] pooled.dtype, grad_conv_weights [nb, R, C], grad_bn_weights [nb, R],
        grad_bn_biases [nb, R])``, the parameter gradients in the accumulation dtype. In training the
        gradient flows through the batch statistics.
    """
    n, c, s = pooled.shape
    nb, r = len(bins), conv_weights[0].shape[0]
    assert grad_out.is_contiguous() and pooled.is_contiguous() and bn_input.is_contiguous()
    dt = acc_dtype(pooled.dtype)
    dev = pooled.device
    w, bn = _pack_params(conv_weights, bn_weights, bn_biases, mean.unbind(0), var.unbind(0), pooled.dtype)
    bins_t = _bin_table(bins, dev)
    dz = torch.empty(n, r, s, dtype=dt, device=dev)
    grad_bn_weight = torch.empty(nb, r, dtype=dt, device=dev)
    grad_bn_bias = torch.empty(nb, r, dtype=dt, device=dev)
    grad_pooled = torch.empty(n, c, s, dtype=pooled.dtype, device=dev)
    gw = torch.empty(nb, r, c, dtype=dt, device=dev)

    cfg = REDUCTION_BWD_CONFIGS[config or _reduction_config(pooled.dtype, n * max(bins) ** 2, r, c)]
    acc = acc_tl(pooled.dtype)

    bm, br, nw = cfg["bn"]
    tiles = _row_tiles(n, bins, bm)
    part = torch.empty(2, tiles, r, dtype=dt, device=dev)
    for pass_ in (1, 2):
        _bn_bwd_kernel[(tiles, triton.cdiv(r, br))](
            grad_out, bn_input, bn, bins_t, dz, part, grad_bn_weight, grad_bn_bias, n, r, s, tiles, *eps_args(eps),
            NB=nb, TRAINING=bool(training), PASS=pass_, BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=acc, num_warps=nw)

    bm, bc, bk, nw = cfg["dgrad"]
    _dgrad_kernel[(_row_tiles(n, bins, bm), triton.cdiv(c, bc))](
        dz, w, bins_t, grad_pooled, n, c, r, s,
        NB=nb, BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=acc, DOT_PRECISION=_dot_precision(pooled, False),
        num_warps=nw)

    br, bc, bk, nw = cfg["wgrad"]
    _wgrad_kernel[(nb * triton.cdiv(r, br) * triton.cdiv(c, bc),)](
        dz, pooled, bins_t, gw, n, c, r, s,
        NB=nb, BLOCK_R=br, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=acc, DOT_PRECISION=_dot_precision(pooled, True),
        num_warps=nw)

    return grad_pooled, gw, grad_bn_weight, grad_bn_bias


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

def _compile_precision(dtype: torch.dtype, fp32_result: bool) -> str:
    """``DOT_PRECISION`` of the compile configs: what a GPU launch picks by default (:func:`_dot_precision`)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32x3" if fp32_result else "tf32"
    return "ieee" if dtype == torch.float64 else "tf32"


def compile_configs(dtypes: Sequence[torch.dtype]):
    """``[(kernel, CompileConfig)]`` for every block config the launchers can pick, per dtype."""
    out = []
    for dtype in dtypes:
        dt, acc = SIG_DTYPE[dtype], SIG_DTYPE[acc_dtype(dtype)]
        tacc = acc_tl(dtype)
        # Forward weights are x's dtype (pure low precision) or fp32 (AMP: fp32 master weights).
        wdts = (dt,) if dt == acc else (dt, acc)
        for wdt in wdts:
            sig = {"p_ptr": f"*{dt}", "w_ptr": f"*{wdt}", "bn_ptr": f"*{wdt}", "bin_ptr": "*i32",
                   "out_ptr": f"*{dt}", "z_ptr": f"*{acc}", "part_ptr": f"*{acc}", "mean_ptr": f"*{acc}",
                   "var_ptr": f"*{acc}", "N": "i32", "C": "i32", "R": "i32", "S": "i32", "T": "i32",
                   "eps_hi": "fp32", "eps_lo": "fp32", "NB": "constexpr", "TRAINING": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
                   "ACC_DTYPE": "constexpr", "DOT_UPCAST": "constexpr", "DOT_PRECISION": "constexpr"}
            for name in launcher_configs(dtype):
                bm, br, bk, nw, nw_bn = REDUCTION_FWD_CONFIGS[name]
                for training in (True, False):
                    out.append((_reduction_fwd_kernel, CompileConfig(
                        f"reduction_fwd/{dt}/w{wdt}/{name}/{'train' if training else 'eval'}", sig,
                        dict(NB=4, TRAINING=training, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, ACC_DTYPE=tacc,
                             DOT_UPCAST=False, DOT_PRECISION=_compile_precision(dtype, True)), num_warps=nw)))
                    if training:
                        out.append((_reduction_bn_act_kernel, CompileConfig(
                            f"reduction_bn_act/{dt}/w{wdt}/{name}",
                            {"z_ptr": f"*{acc}", "bn_ptr": f"*{wdt}", "bin_ptr": "*i32", "part_ptr": f"*{acc}",
                             "out_ptr": f"*{dt}", "mean_ptr": f"*{acc}", "var_ptr": f"*{acc}", "N": "i32",
                             "R": "i32", "S": "i32", "T": "i32", "eps_hi": "fp32", "eps_lo": "fp32",
                             "NB": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                             "ACC_DTYPE": "constexpr"},
                            dict(NB=4, BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=tacc), num_warps=nw_bn)))
        for name in launcher_configs(dtype):
            cfg = REDUCTION_BWD_CONFIGS[name]
            bm, br, nw = cfg["bn"]
            for training in (True, False):
                for pass_ in (1, 2):
                    out.append((_bn_bwd_kernel, CompileConfig(
                        f"bn_bwd/{dt}/{name}/{'train' if training else 'eval'}{pass_}",
                        {"go_ptr": f"*{dt}", "z_ptr": f"*{acc}", "bn_ptr": f"*{acc}", "bin_ptr": "*i32",
                         "dz_ptr": f"*{acc}", "part_ptr": f"*{acc}", "grad_bn_weight_ptr": f"*{acc}",
                         "grad_bn_bias_ptr": f"*{acc}", "N": "i32", "R": "i32", "S": "i32", "T": "i32",
                         "eps_hi": "fp32", "eps_lo": "fp32", "NB": "constexpr", "TRAINING": "constexpr",
                         "PASS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                         "ACC_DTYPE": "constexpr"},
                        dict(NB=4, TRAINING=training, PASS=pass_, BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=tacc),
                        num_warps=nw)))
            # Backward weights are packed with the fp32/fp64 statistics, hence always the acc dtype.
            bm, bc, bk, nw = cfg["dgrad"]
            out.append((_dgrad_kernel, CompileConfig(
                f"dgrad/{dt}/{name}",
                {"dz_ptr": f"*{acc}", "w_ptr": f"*{acc}", "bin_ptr": "*i32", "gp_ptr": f"*{dt}",
                 "N": "i32", "C": "i32", "R": "i32", "S": "i32", "NB": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr",
                 "ACC_DTYPE": "constexpr", "DOT_PRECISION": "constexpr"},
                dict(NB=4, BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=tacc,
                     DOT_PRECISION=_compile_precision(dtype, False)),
                num_warps=nw)))
            br, bc, bk, nw = cfg["wgrad"]
            out.append((_wgrad_kernel, CompileConfig(
                f"wgrad/{dt}/{name}",
                {"dz_ptr": f"*{acc}", "p_ptr": f"*{dt}", "bin_ptr": "*i32", "gw_ptr": f"*{acc}",
                 "N": "i32", "C": "i32", "R": "i32", "S": "i32", "NB": "constexpr",
                 "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr",
                 "ACC_DTYPE": "constexpr", "DOT_PRECISION": "constexpr"},
                dict(NB=4, BLOCK_R=br, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=tacc,
                     DOT_PRECISION=_compile_precision(dtype, True)),
                num_warps=nw)))
    return out
