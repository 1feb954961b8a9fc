"""``psp::reduction_conv_bn_relu``: every bin's 1x1 reduction conv (no bias) + BatchNorm + ReLU on the packed
pooled tensor (semseg's PPM branch after its pooling: ``reduction_dim`` channels per bin).

The op is functional: it returns the statistics it normalised with, and :func:`reduction_conv_bn_relu`
updates the running statistics from them exactly as ``nn.BatchNorm2d`` does. Kernels
(``psp_kernels.dispatch.KERNEL_TABLE``): ``csrc/cpu/reduction.cpp``, ``psp_kernels/triton/reduction.py``,
``csrc/cuda/reduction.cu``, ``psp_kernels.reference``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from ..batchnorm import unstack_param_grads, update_running_stats
from ..dispatch import define
from ..geometry import DEFAULT_BINS, acc_dtype, check_bins, packed_size
from .checks import check_tensor, check_tensor_list

reduction = define(
    "reduction_conv_bn_relu",
    "(Tensor pooled, Tensor[] conv_weights, Tensor[] bn_weights, Tensor[] bn_biases, Tensor[] running_means, "
    "Tensor[] running_vars, int[] bins, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    reference.reduction_conv_bn_relu)
reduction_backward = define(
    "reduction_conv_bn_relu_backward",
    "(Tensor grad_out, Tensor pooled, Tensor bn_input, Tensor[] conv_weights, Tensor[] bn_weights, "
    "Tensor[] bn_biases, Tensor mean, Tensor var, int[] bins, bool training, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    reference.reduction_conv_bn_relu_backward)


@reduction.register_fake
def _(pooled, conv_weights, bn_weights, bn_biases, running_means, running_vars, bins, training, eps):
    n, _, s = pooled.shape
    r, acc = conv_weights[0].shape[0], acc_dtype(pooled.dtype)
    return (pooled.new_empty(n, r, s), pooled.new_empty(n, r, s, dtype=acc),
            pooled.new_empty(len(bins), r, dtype=acc), pooled.new_empty(len(bins), r, dtype=acc))


@reduction_backward.register_fake
def _(grad_out, pooled, bn_input, conv_weights, bn_weights, bn_biases, mean, var, bins, training, eps):
    return param_grads_like(pooled, bn_input, conv_weights, bins)


def param_grads_like(pooled, bn_input, conv_weights, bins):
    """Fake results of the reduction backward: grad_pooled and the stacked parameter gradients
    [nb, R, C], [nb, R], [nb, R] in the accumulation dtype (also the whole-PPM backward's)."""
    nb, (r, c), acc = len(bins), conv_weights[0].shape[:2], bn_input.dtype
    return (torch.empty_like(pooled), bn_input.new_empty(nb, r, c, dtype=acc), bn_input.new_empty(nb, r, dtype=acc),
            bn_input.new_empty(nb, r, dtype=acc))


def _setup_context(ctx, inputs, output):
    pooled, conv_weights, bn_weights, bn_biases, _, _, bins, training, eps = inputs
    _, bn_input, mean, var = output
    ctx.mark_non_differentiable(bn_input, mean, var)
    ctx.save_for_backward(pooled, bn_input, mean, var, *conv_weights, *bn_weights, *bn_biases)
    ctx.nb, ctx.bins, ctx.training, ctx.eps = len(bins), list(bins), training, eps


def split_params(ctx) -> tuple:
    """(the tensors saved before the parameters, conv_weights, bn_weights, bn_biases) of a context saved as
    above (also the whole-PPM op's)."""
    nb, saved = ctx.nb, ctx.saved_tensors
    first, params = saved[:-3 * nb], saved[-3 * nb:]
    return first, params[:nb], params[nb:2 * nb], params[2 * nb:]


def unstack_grads(grad_w, grad_bn_w, grad_bn_b, conv_weights, bn_weights, bn_biases) -> tuple:
    """The stacked parameter gradients as autograd's per-parameter list results."""
    return (unstack_param_grads(grad_w, conv_weights), unstack_param_grads(grad_bn_w, bn_weights),
            unstack_param_grads(grad_bn_b, bn_biases))


def _backward(ctx, grad_out, _grad_bn_input, _grad_mean, _grad_var):
    (pooled, bn_input, mean, var), conv_weights, bn_weights, bn_biases = split_params(ctx)
    grad_pooled, *stacked = reduction_backward(grad_out.contiguous(), pooled, bn_input, conv_weights, bn_weights,
                                               bn_biases, mean, var, ctx.bins, ctx.training, ctx.eps)
    no_grad = [None] * ctx.nb  # running statistics are buffers
    return (grad_pooled, *unstack_grads(*stacked, conv_weights, bn_weights, bn_biases), no_grad, no_grad, None,
            None, None)


reduction.register_autograd(_backward, setup_context=_setup_context)


def reduction_conv_bn_relu(pooled: torch.Tensor, conv_weights: Sequence[torch.Tensor],
                           bn_weights: Sequence[torch.Tensor], bn_biases: Sequence[torch.Tensor],
                           running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                           bins: Sequence[int] = DEFAULT_BINS, training: bool = False,
                           momentum: float | None = 0.1, eps: float = 1e-5,
                           num_batches_tracked: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per bin: 1x1 reduction conv (no bias) -> BatchNorm -> ReLU, all bins in one op.

    Args:
        pooled: packed pooled tensor [N, C, S] (from :func:`multibin_avg_pool`), fp16/bf16/fp32/fp64.
        conv_weights: per bin the conv weight [R, C, 1, 1] (semseg ``features.{k}.1.weight``).
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
        w.r.t. pooled, conv_weights, bn_weights, bn_biases.

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
    conv_weights, per_channel = check_branch_params(n, c, pooled.device, bins, training, conv_weights, bn_weights,
                                                    bn_biases, running_means, running_vars)
    out, _, mean, var = reduction(pooled.contiguous(), conv_weights, *per_channel, bins, training, eps)
    if training:
        update_running_stats(mean, var, per_channel[2], per_channel[3], num_batches_tracked, momentum,
                             [n * b * b for b in bins])
    return out


def check_branch_params(n: int, c: int, device: torch.device, bins: Sequence[int], training: bool, conv_weights,
                        bn_weights, bn_biases, running_means, running_vars):
    """Check the per-bin conv and BatchNorm tensors of a PPM with C input channels and batch N.

    Returns ``(conv_weights, [bn_weights, bn_biases, running_means, running_vars])`` as lists.

    Raises:
        TypeError / ValueError / RuntimeError: a list of the wrong type or length, or a tensor of the
            wrong rank, shape, dtype or device (the message names it); ValueError "Expected more than 1
            value per channel when training" for a bin with N*b*b == 1 in training, as BatchNorm.
    """
    nb = len(bins)
    if not isinstance(conv_weights, (list, tuple)) or not conv_weights:
        raise TypeError("conv_weights must be a non-empty list of conv weights [R, C, 1, 1], one per bin")
    r = check_tensor(conv_weights[0], "conv_weights[0]", 4, device).shape[0]
    conv_weights = check_tensor_list(conv_weights, "conv_weights", nb, (r, c, 1, 1), device)
    per_channel = [check_tensor_list(t, name, nb, (r,), device) for t, name in (
        (bn_weights, "bn_weights"), (bn_biases, "bn_biases"), (running_means, "running_means"),
        (running_vars, "running_vars"))]
    if training:
        for b in bins:
            if n * b * b == 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {torch.Size([n, r, b, b])}")
    return conv_weights, per_channel
