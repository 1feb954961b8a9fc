"""Triton kernels of every bin's 1x1 reduction conv + BatchNorm + ReLU (``psp::reduction_conv_bn_relu`` and its
backward).

Per bin k the packed tensors are GEMM operands without any copy: with ``bb = b_k**2`` and row index
``m = n*bb + s`` (``M_k = N*bb`` rows), ``P_k[m, c] = pooled[n, c, off_k + s]`` and
``Z_k[m, r] = z[n, r, off_k + s]``; ``Z_k = P_k @ W_k^T`` with ``W_k`` [R, C].

The per-bin parameters arrive as lists; the launchers pack them with one ``torch.cat`` (one launch)
into a flat buffer viewed as weights [nb, R, C] and BN vectors [4, nb, R], so one kernel covers every
bin: the eval forward of the whole PPM is then 4 launches (pool, pack, reduction, upsample).

Forward, one launch: program (bin k, block of R channels) owns *all* M_k rows of its channels, so it
can compute the training batch statistics itself (deterministic, no atomics, no second launch):
GEMM -> z and row sums; mean; second pass over z -> centered sum of squares (two-pass variance);
third pass -> BN + ReLU -> out.

Backward, three launches:
  1. ``_bn_bwd_kernel``   (bin, R block): grad_bn_bias, grad_bn_weight over all rows, then dz (fp32/fp64 scratch).
  2. ``_dgrad_kernel``    (bin, M block, C block): grad_pooled = dz @ W_k   (K = R).
  3. ``_wgrad_kernel``    (bin, R block, C block): grad_W_k = dz^T @ P_k    (K = M_k, fixed order).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype, bin_offsets
from ..table_cache import cached_table
from .common import CompileConfig, SIG_DTYPE, acc_tl, bin_channel_block, dot_upcast, eps_args, inv_std, relu_nan

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


@triton.jit
def _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Bin k's (bn_weight, bn_bias, mean, var) of the packed BN buffer, and eps, in the accumulation dtype."""
    bn_weight = tl.load(bn_ptr + k * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    bn_bias = tl.load(bn_ptr + (NB + k) * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    mean = tl.load(bn_ptr + (2 * NB + k) * R + offs_r, mask=mask_r, other=0.0).to(ACC_DTYPE)
    var = tl.load(bn_ptr + (3 * NB + k) * R + offs_r, mask=mask_r, other=1.0).to(ACC_DTYPE)
    return bn_weight, bn_bias, mean, var, tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _reduction_fwd_kernel(
    p_ptr,                      # pooled [N, C, S] contiguous
    w_ptr,                      # weights [nb, R, C] contiguous (x dtype or acc dtype)
    bn_ptr,                     # [4, nb, R] (bn_weight, bn_bias, running mean, running var), w's dtype
    bin_ptr,                    # i32 [2, nb]: size, packed offset
    out_ptr,                    # [N, R, S] pooled dtype
    z_ptr,                      # [N, R, S] acc dtype
    mean_ptr, var_ptr,          # [nb, R] acc dtype
    N, C, R, S, eps_hi, eps_lo,  # eps = eps_hi + eps_lo (fp32 arguments, see eps_args)
    NB: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # Decomposition: one program per (bin k, block of BLOCK_R output channels), looping over all
    # M_k = N*b*b rows in BLOCK_M tiles and over C in BLOCK_K steps (fixed order -> deterministic stats).
    pid = tl.program_id(0)
    k, offs_r, mask_r, b, off = bin_channel_block(pid, R, bin_ptr, NB, BLOCK_R)
    bb = b * b
    M = N * bb

    bn_weight, bn_bias, mean, var, eps = _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB, ACC_DTYPE)
    w_rows = w_ptr + (k * R + offs_r).to(tl.int64) * C                     # W_k[r, :]

    if not TRAINING:
        # Eval: the statistics are the running ones, so BN + ReLU happen in the GEMM epilogue.
        scale = bn_weight * inv_std(var, eps, ACC_DTYPE)
        shift = bn_bias - mean * scale

    # Pass 1: Z = P_k @ W_k^T, stored to z; column sums for the batch mean (training).
    zsum = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n_idx = offs_m // bb
        s_idx = off + offs_m % bb
        p_rows = p_ptr + n_idx.to(tl.int64) * C * S + s_idx                # P_k[m, 0]
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC_DTYPE)
        for c0 in range(0, C, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < C
            a = tl.load(p_rows[:, None] + offs_k[None, :] * S, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_rows[None, :] + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if DOT_UPCAST:
                a = a.to(ACC_DTYPE)
                wt = wt.to(ACC_DTYPE)
            acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision="ieee")
        z_off = (n_idx.to(tl.int64) * R * S + s_idx)[:, None] + offs_r[None, :] * S
        mask_mr = mask_m[:, None] & mask_r[None, :]
        tl.store(z_ptr + z_off, acc, mask=mask_mr)
        if TRAINING:
            zsum += tl.sum(acc, axis=0)          # masked rows/cols are exact zeros
        else:
            y = acc * scale[None, :] + shift[None, :]
            tl.store(out_ptr + z_off, relu_nan(y).to(out_ptr.dtype.element_ty), mask=mask_mr)

    if TRAINING:
        # Every z element re-read below was written by this program: a CTA barrier makes the global
        # writes of all its threads visible to all of them.
        tl.debug_barrier()
        mean = zsum / M
        # Pass 2: biased variance, centered (two-pass) for accuracy.
        sq = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            z_off = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
            mask_mr = mask_m[:, None] & mask_r[None, :]
            d = tl.where(mask_mr, tl.load(z_ptr + z_off, mask=mask_mr, other=0.0) - mean[None, :], 0.0)
            sq += tl.sum(d * d, axis=0)
        var = sq / M
        # Pass 3: BN + ReLU.
        scale = bn_weight * inv_std(var, eps, ACC_DTYPE)
        shift = bn_bias - mean * scale
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            z_off = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
            mask_mr = mask_m[:, None] & mask_r[None, :]
            zt = tl.load(z_ptr + z_off, mask=mask_mr, other=0.0)
            y = zt * scale[None, :] + shift[None, :]
            tl.store(out_ptr + z_off, relu_nan(y).to(out_ptr.dtype.element_ty), mask=mask_mr)
    tl.store(mean_ptr + k * R + offs_r, mean, mask=mask_r)
    tl.store(var_ptr + k * R + offs_r, var, mask=mask_r)


# Block configs. Forward: (BLOCK_M, BLOCK_R, BLOCK_K, num_warps). Backward: per kernel, bn = (BLOCK_M,
# BLOCK_R, num_warps), dgrad = (BLOCK_M, BLOCK_C, BLOCK_K, num_warps), wgrad = (BLOCK_R, BLOCK_C,
# BLOCK_K, num_warps). "small" serves fp64 and tiny problems; the compile test builds every entry.
REDUCTION_FWD_CONFIGS = {"big": (64, 64, 64, 4), "small": (16, 16, 32, 4)}
REDUCTION_BWD_CONFIGS = {
    "big": dict(bn=(64, 32, 4), dgrad=(64, 64, 32, 4), wgrad=(64, 64, 32, 4)),
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
    """Per bin: 1x1 reduction conv (no bias) + BatchNorm + ReLU on the packed pooled tensor, one launch.

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
    bm, br, bk, nw = REDUCTION_FWD_CONFIGS[config or _reduction_config(pooled.dtype, n * max(bins) ** 2, r, c)]
    grid = (nb * triton.cdiv(r, br),)
    _reduction_fwd_kernel[grid](
        pooled, w, bn, _bin_table(bins, dev), out, z, mean, var, n, c, r, s, *eps_args(eps),
        NB=nb, TRAINING=bool(training), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
        ACC_DTYPE=acc_tl(pooled.dtype), DOT_UPCAST=dot_upcast(w.dtype), num_warps=nw)
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
    grad_bn_weight_ptr, grad_bn_bias_ptr,      # out: [nb, R] acc
    N, R, S, eps_hi, eps_lo,
    NB: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # Decomposition: one program per (bin k, block of BLOCK_R channels) over all M_k rows: pass 1
    # reduces grad_bn_bias = sum g and grad_bn_weight = sum g*xhat (g = grad_out masked by ReLU), pass 2 writes dz.
    pid = tl.program_id(0)
    k, offs_r, mask_r, b, off = bin_channel_block(pid, R, bin_ptr, NB, BLOCK_R)
    bb = b * b
    M = N * bb

    bn_weight, bn_bias, mean, var, eps = _bn_params(bn_ptr, k, offs_r, mask_r, R, eps_hi, eps_lo, NB, ACC_DTYPE)
    invstd = inv_std(var, eps, ACC_DTYPE)
    scale = bn_weight * invstd
    shift = bn_bias - mean * scale

    grad_bn_bias = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    grad_bn_weight = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        off_mr = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
        mask_mr = (offs_m < M)[:, None] & mask_r[None, :]
        zt = tl.load(z_ptr + off_mr, mask=mask_mr, other=0.0)
        go = tl.load(go_ptr + off_mr, mask=mask_mr, other=0.0).to(ACC_DTYPE)
        g = tl.where(zt * scale[None, :] + shift[None, :] > 0, go, 0.0)
        grad_bn_bias += tl.sum(g, axis=0)
        grad_bn_weight += tl.sum(g * ((zt - mean[None, :]) * invstd[None, :]), axis=0)
    tl.store(grad_bn_bias_ptr + k * R + offs_r, grad_bn_bias, mask=mask_r)
    tl.store(grad_bn_weight_ptr + k * R + offs_r, grad_bn_weight, mask=mask_r)

    grad_bn_bias_m = grad_bn_bias / M
    grad_bn_weight_m = grad_bn_weight / M
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        off_mr = ((offs_m // bb).to(tl.int64) * R * S + off + offs_m % bb)[:, None] + offs_r[None, :] * S
        mask_mr = (offs_m < M)[:, None] & mask_r[None, :]
        zt = tl.load(z_ptr + off_mr, mask=mask_mr, other=0.0)
        go = tl.load(go_ptr + off_mr, mask=mask_mr, other=0.0).to(ACC_DTYPE)
        g = tl.where(zt * scale[None, :] + shift[None, :] > 0, go, 0.0)
        if TRAINING:
            xhat = (zt - mean[None, :]) * invstd[None, :]
            dz = scale[None, :] * (g - grad_bn_bias_m[None, :] - xhat * grad_bn_weight_m[None, :])
        else:
            dz = g * scale[None, :]
        tl.store(dz_ptr + off_mr, dz, mask=mask_mr)


@triton.jit
def _dgrad_kernel(
    dz_ptr,                     # [N, R, S] acc
    w_ptr,                      # [nb, R, C]
    bin_ptr,                    # i32 [2, nb]
    gp_ptr,                     # out: grad_pooled [N, C, S] pooled dtype
    N, C, R, S,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # Decomposition: grid (max M blocks * C blocks, nb); program (k, m block, c block) computes
    # grad_pooled[m, c] = sum_r dz[m, r] * W_k[r, c] over its tile (programs past bin k's M_k rows
    # do nothing). Every grad_pooled element belongs to exactly one bin, hence one program.
    k = tl.program_id(1)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    m0 = (tl.program_id(0) // n_cblocks) * BLOCK_M
    offs_c = (tl.program_id(0) % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.load(bin_ptr + k)
    off = tl.load(bin_ptr + NB + k)
    bb = b * b
    M = N * bb
    if m0 < M:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_c = offs_c < C
        n_idx = (offs_m // bb).to(tl.int64)
        s_idx = off + offs_m % bb
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC_DTYPE)
        for r0 in range(0, R, BLOCK_K):
            offs_k = r0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < R
            a = tl.load(dz_ptr + (n_idx * R * S + s_idx)[:, None] + offs_k[None, :] * S,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + (k * R + offs_k).to(tl.int64)[:, None] * C + offs_c[None, :],
                         mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            acc = tl.dot(a, wt.to(ACC_DTYPE), acc, input_precision="ieee")
        tl.store(gp_ptr + (n_idx * C * S + s_idx)[:, None] + offs_c[None, :].to(tl.int64) * S,
                 acc.to(gp_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_kernel(
    dz_ptr,                     # [N, R, S] acc
    p_ptr,                      # pooled [N, C, S]
    bin_ptr,                    # i32 [2, nb]
    gw_ptr,                     # out: [nb, R, C] acc
    N, C, R, S,
    NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
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
        p = tl.load(p_ptr + (n_idx * C * S + s_idx)[:, None] + offs_c[None, :].to(tl.int64) * S,
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)                  # P_k [M, C]
        acc = tl.dot(a, p.to(ACC_DTYPE), acc, input_precision="ieee")
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

    m_max = n * max(bins) ** 2
    cfg = REDUCTION_BWD_CONFIGS[config or _reduction_config(pooled.dtype, m_max, r, c)]
    acc = acc_tl(pooled.dtype)

    bm, br, nw = cfg["bn"]
    _bn_bwd_kernel[(nb * triton.cdiv(r, br),)](
        grad_out, bn_input, bn, bins_t, dz, grad_bn_weight, grad_bn_bias, n, r, s, *eps_args(eps),
        NB=nb, TRAINING=bool(training), BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=acc, num_warps=nw)

    bm, bc, bk, nw = cfg["dgrad"]
    _dgrad_kernel[(triton.cdiv(m_max, bm) * triton.cdiv(c, bc), nb)](
        dz, w, bins_t, grad_pooled, n, c, r, s,
        NB=nb, BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=acc, num_warps=nw)

    br, bc, bk, nw = cfg["wgrad"]
    _wgrad_kernel[(nb * triton.cdiv(r, br) * triton.cdiv(c, bc),)](
        dz, pooled, bins_t, gw, n, c, r, s,
        NB=nb, BLOCK_R=br, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=acc, num_warps=nw)

    return grad_pooled, gw, grad_bn_weight, grad_bn_bias


# --------------------------------------------------------------------------------------------------
# Compile-only registry
# --------------------------------------------------------------------------------------------------

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
                   "out_ptr": f"*{dt}", "z_ptr": f"*{acc}", "mean_ptr": f"*{acc}", "var_ptr": f"*{acc}",
                   "N": "i32", "C": "i32", "R": "i32", "S": "i32", "eps_hi": "fp32", "eps_lo": "fp32",
                   "NB": "constexpr", "TRAINING": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
                   "ACC_DTYPE": "constexpr", "DOT_UPCAST": "constexpr"}
            for name in launcher_configs(dtype):
                bm, br, bk, nw = REDUCTION_FWD_CONFIGS[name]
                for training in (True, False):
                    out.append((_reduction_fwd_kernel, CompileConfig(
                        f"reduction_fwd/{dt}/w{wdt}/{name}/{'train' if training else 'eval'}", sig,
                        dict(NB=4, TRAINING=training, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
                             ACC_DTYPE=tacc, DOT_UPCAST=False), num_warps=nw)))
        for name in launcher_configs(dtype):
            cfg = REDUCTION_BWD_CONFIGS[name]
            bm, br, nw = cfg["bn"]
            for training in (True, False):
                out.append((_bn_bwd_kernel, CompileConfig(
                    f"bn_bwd/{dt}/{name}/{'train' if training else 'eval'}",
                    {"go_ptr": f"*{dt}", "z_ptr": f"*{acc}", "bn_ptr": f"*{acc}", "bin_ptr": "*i32",
                     "dz_ptr": f"*{acc}", "grad_bn_weight_ptr": f"*{acc}", "grad_bn_bias_ptr": f"*{acc}",
                     "N": "i32", "R": "i32", "S": "i32", "eps_hi": "fp32", "eps_lo": "fp32",
                     "NB": "constexpr", "TRAINING": "constexpr",
                     "BLOCK_M": "constexpr", "BLOCK_R": "constexpr", "ACC_DTYPE": "constexpr"},
                    dict(NB=4, TRAINING=training, BLOCK_M=bm, BLOCK_R=br, ACC_DTYPE=tacc), num_warps=nw)))
            # Backward weights are packed with the fp32/fp64 statistics, hence always the acc dtype.
            bm, bc, bk, nw = cfg["dgrad"]
            out.append((_dgrad_kernel, CompileConfig(
                f"dgrad/{dt}/{name}",
                {"dz_ptr": f"*{acc}", "w_ptr": f"*{acc}", "bin_ptr": "*i32", "gp_ptr": f"*{dt}",
                 "N": "i32", "C": "i32", "R": "i32", "S": "i32", "NB": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr",
                 "ACC_DTYPE": "constexpr"},
                dict(NB=4, BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=tacc), num_warps=nw)))
            br, bc, bk, nw = cfg["wgrad"]
            out.append((_wgrad_kernel, CompileConfig(
                f"wgrad/{dt}/{name}",
                {"dz_ptr": f"*{acc}", "p_ptr": f"*{dt}", "bin_ptr": "*i32", "gw_ptr": f"*{acc}",
                 "N": "i32", "C": "i32", "R": "i32", "S": "i32", "NB": "constexpr",
                 "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr",
                 "ACC_DTYPE": "constexpr"},
                dict(NB=4, BLOCK_R=br, BLOCK_C=bc, BLOCK_K=bk, ACC_DTYPE=tacc), num_warps=nw)))
    return out
