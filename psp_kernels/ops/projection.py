"""``psp::project_bn_relu``: every bin's 1x1 conv (no bias) + BatchNorm + ReLU on the packed pooled tensor.

The custom op is functional: it returns the statistics it normalised with, and the public function
:func:`project_bn_relu` updates the running statistics from them exactly as ``nn.BatchNorm2d`` does.
Kernels: ``psp_kernels/triton/projection.py`` (CUDA), ``csrc/cpu/projection.cpp`` (CPU),
``psp_kernels.reference.project_forward`` (oracle).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..backends import resolve
from ..geometry import DEFAULT_BINS, acc_dtype, check_bins, packed_size
from ._checks import check_tensor, check_tensor_list


@torch.library.custom_op("psp::project_bn_relu", mutates_args=())
def _project(pooled: torch.Tensor, weights: list[torch.Tensor], gammas: list[torch.Tensor],
             betas: list[torch.Tensor], running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
             bins: Sequence[int], training: bool, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, z, mean, var = resolve(pooled.device).project_forward(
        pooled, weights, gammas, betas, running_means, running_vars, list(bins), training, eps)
    return out, z, mean, var


@_project.register_fake
def _(pooled, weights, gammas, betas, running_means, running_vars, bins, training, eps):
    n, _, s = pooled.shape
    r, acc = weights[0].shape[0], acc_dtype(pooled.dtype)
    return (pooled.new_empty(n, r, s), pooled.new_empty(n, r, s, dtype=acc),
            pooled.new_empty(len(bins), r, dtype=acc), pooled.new_empty(len(bins), r, dtype=acc))


@torch.library.custom_op("psp::project_bn_relu_backward", mutates_args=())
def _project_backward(grad_out: torch.Tensor, pooled: torch.Tensor, z: torch.Tensor,
                      weights: list[torch.Tensor], gammas: list[torch.Tensor], betas: list[torch.Tensor],
                      mean: torch.Tensor, var: torch.Tensor, bins: Sequence[int], training: bool, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns grad_pooled [N, C, S] and the per-bin parameter gradients stacked: [nb, R, C], [nb, R], [nb, R]."""
    grad_pooled, grad_w, grad_gamma, grad_beta = resolve(grad_out.device).project_backward(
        grad_out.contiguous(), pooled, z, weights, gammas, betas, mean, var, list(bins), training, eps)
    return (grad_pooled, *stack_param_grads(grad_w, grad_gamma, grad_beta, z.dtype))


def stack_param_grads(grad_w, grad_gamma, grad_beta, dtype):
    """Per-bin parameter gradient lists -> stacked [nb, R, C], [nb, R], [nb, R] in ``dtype`` (a custom op
    may not return views of one buffer, and lists of tensors are not a legal return type)."""
    stack = lambda grads: torch.stack([g.reshape(g.shape[0], -1).squeeze(-1).to(dtype) for g in grads])  # noqa: E731
    return stack(grad_w), stack(grad_gamma), stack(grad_beta)


def _as_param_grad(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` shaped, typed and strided as ``param`` (a channels_last 1x1 weight has other strides than
    its contiguous gradient, and DDP's gradient buckets require the parameter's exact strides)."""
    grad = grad.reshape(param.shape).to(param.dtype)
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def unstack_param_grads(grad_w, grad_gamma, grad_beta, weights, gammas, betas):
    """Inverse of :func:`stack_param_grads`: per-bin gradients shaped, typed and strided as the parameters."""
    unstack = lambda grads, params: [_as_param_grad(g, p) for g, p in zip(grads, params)]  # noqa: E731
    return unstack(grad_w, weights), unstack(grad_gamma, gammas), unstack(grad_beta, betas)


@_project_backward.register_fake
def _(grad_out, pooled, z, weights, gammas, betas, mean, var, bins, training, eps):
    nb, (r, c), acc = len(bins), weights[0].shape[:2], z.dtype
    return (torch.empty_like(pooled), z.new_empty(nb, r, c, dtype=acc), z.new_empty(nb, r, dtype=acc),
            z.new_empty(nb, r, dtype=acc))


def _setup_context(ctx, inputs, output):
    pooled, weights, gammas, betas, _, _, bins, training, eps = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.save_for_backward(pooled, z, mean, var, *weights, *gammas, *betas)
    ctx.nb, ctx.bins, ctx.training, ctx.eps = len(bins), list(bins), training, eps


def _backward(ctx, grad_out, _gz, _gmean, _gvar):
    pooled, z, mean, var, *params = ctx.saved_tensors
    nb = ctx.nb
    weights, gammas, betas = params[:nb], params[nb:2 * nb], params[2 * nb:]
    grad_pooled, grad_w, grad_gamma, grad_beta = _project_backward(
        grad_out, pooled, z, weights, gammas, betas, mean, var, ctx.bins, ctx.training, ctx.eps)
    grad_w, grad_gamma, grad_beta = unstack_param_grads(grad_w, grad_gamma, grad_beta, weights, gammas, betas)
    no_grad = [None] * nb  # running statistics are buffers
    return grad_pooled, grad_w, grad_gamma, grad_beta, no_grad, no_grad, None, None, None


_project.register_autograd(_backward, setup_context=_setup_context)


def update_running_stats(mean, var, running_means, running_vars, num_batches_tracked, momentum, counts):
    """nn.BatchNorm2d's update of each BatchNorm k: r = (1 - m) * r + m * stat, with the unbiased variance
    counts[k] / (counts[k] - 1) * var (counts[k] values per channel; for a PPM bin b, N*b*b)."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            torch._foreach_add_(num_batches_tracked, 1)
        for k, (rm, rv) in enumerate(zip(running_means, running_vars)):
            m = momentum if momentum is not None else 1.0 / float(num_batches_tracked[k])
            rm.mul_(1.0 - m).add_(mean[k].to(rm.dtype), alpha=m)
            rv.mul_(1.0 - m).add_((var[k] * (counts[k] / (counts[k] - 1))).to(rv.dtype), alpha=m)


def project_bn_relu(pooled: torch.Tensor, weights: Sequence[torch.Tensor], bn_weights: Sequence[torch.Tensor],
                    bn_biases: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                    running_vars: Sequence[torch.Tensor], bins: Sequence[int] = DEFAULT_BINS,
                    training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
                    num_batches_tracked: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per bin: 1x1 conv (no bias) -> BatchNorm -> ReLU, all bins in one op.

    Args:
        pooled: packed pooled tensor [N, C, S] (from :func:`multibin_avg_pool`), fp16/bf16/fp32/fp64.
        weights: per bin the conv weight [R, C, 1, 1] (semseg ``features.{k}.1.weight``).
        bn_weights, bn_biases, running_means, running_vars: per bin the BatchNorm tensors [R]
            (``features.{k}.2.*``). Parameters may be pooled's dtype or fp32; math runs in fp32 (fp64).
        bins: the bin sizes pooled was made with.
        training: batch statistics (biased variance to normalise) and an in-place update of
            ``running_means``/``running_vars`` (unbiased variance) and ``num_batches_tracked`` exactly as
            ``nn.BatchNorm2d``; otherwise the running statistics normalise and nothing is modified.
        momentum: running-average factor; ``None`` uses the cumulative average 1/num_batches_tracked.
        eps: added to the variance.
        num_batches_tracked: per bin the int64 counter to increment in training (optional).

    Returns:
        Packed branches [N, R, S], pooled's dtype (bin k at ``[:, :, off_k:off_k + b*b]``). Differentiable
        w.r.t. pooled, weights, bn_weights, bn_biases.

    Raises:
        TypeError / ValueError / RuntimeError: wrong rank, shape, dtype or device of any argument
            (the message names it); ValueError "Expected more than 1 value per channel when training"
            when a bin has N*b*b == 1 in training, as PyTorch's BatchNorm.

    Source: hszhao/semseg ``model/pspnet.py`` (PPM branch = pool -> conv1x1 -> BN -> ReLU).
    """
    bins = check_bins(bins)
    check_tensor(pooled, "pooled", 3)
    n, c, s = pooled.shape
    if s != packed_size(bins):
        raise ValueError(f"pooled must have S = sum(b*b) = {packed_size(bins)} packed cells for bins {bins}, "
                         f"got {s}")
    weights, per_channel = check_branch_params(n, c, pooled.device, bins, training, weights, bn_weights, bn_biases,
                                               running_means, running_vars)
    out, _, mean, var = _project(pooled, weights, *per_channel, bins, training, eps)
    if training:
        update_running_stats(mean, var, per_channel[2], per_channel[3], num_batches_tracked, momentum,
                             [n * b * b for b in bins])
    return out


def check_branch_params(n: int, c: int, device: torch.device, bins: Sequence[int], training: bool, weights,
                        bn_weights, bn_biases, running_means, running_vars):
    """Check the per-bin conv and BatchNorm tensors of a PPM with C input channels and batch N.

    Returns ``(weights, [bn_weights, bn_biases, running_means, running_vars])`` as lists.

    Raises:
        TypeError / ValueError / RuntimeError: a list of the wrong type or length, or a tensor of the
            wrong rank, shape, dtype or device (the message names it); ValueError "Expected more than 1
            value per channel when training" for a bin with N*b*b == 1 in training, as BatchNorm.
    """
    nb = len(bins)
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of conv weights [R, C, 1, 1], one per bin")
    r = check_tensor(weights[0], "weights[0]", 4, device).shape[0]
    weights = check_tensor_list(weights, "weights", nb, (r, c, 1, 1), device)
    per_channel = [check_tensor_list(t, name, nb, (r,), device) for t, name in (
        (bn_weights, "bn_weights"), (bn_biases, "bn_biases"), (running_means, "running_means"),
        (running_vars, "running_vars"))]
    if training:
        for b in bins:
            if n * b * b == 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {torch.Size([n, r, b, b])}")
    return weights, per_channel
