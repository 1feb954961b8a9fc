"""``psp::pyramid_pooling``: the whole pyramid pooling module as one op, three streaming passes.

Forward (docs/ppm_byte_model.md): the pooling pass reads x once for every bin and copies it into the
concat buffer it allocates (``multibin_avg_pool_with_concat``), the tiny reduction step (1x1 conv + BN +
ReLU of every bin), then the upsampling pass writes only the branch channels of that buffer
(``upsample_into``): 3P bytes for P = bytes of x, against 4P for the three separate ops and 9P eager.
Backward: the transposed interpolation reads the branch half of the gradient, the reduction backward is
tiny, and the pooling backward adds the pass-through gradient of x in the same pass
(``multibin_avg_pool_backward_add``): 3P, against 5P for the separate ops. x itself is not saved for
backward. Each pass is a kernel op of ``psp_kernels/ops/{pooling,reduction,upsample}.py``, so each runs
the kernel the table (``psp_kernels.dispatch``) picks for the device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..batchnorm import update_running_stats
from ..geometry import DEFAULT_BINS, acc_dtype, check_bins, is_channels_last, packed_size
from .checks import check_tensor, layout_for_kernels
from .pooling import pool_backward_add, pool_with_concat
from .reduction import (check_branch_params, param_grads_like, reduction, reduction_backward, split_params,
                        unstack_grads)
from .upsample import upsample_backward, upsample_into


@torch.library.custom_op("psp::pyramid_pooling", mutates_args=())
def _ppm(x: torch.Tensor, conv_weights: list[torch.Tensor], bn_weights: list[torch.Tensor],
         bn_biases: list[torch.Tensor], running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
         bins: Sequence[int], training: bool, eps: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (concat, pooled, bn_input, mean, var); the last four are saved for backward / the BN update."""
    bins = list(bins)
    pooled, concat = pool_with_concat(x, bins, x.shape[1] + len(bins) * conv_weights[0].shape[0])
    branches, bn_input, mean, var = reduction(pooled, conv_weights, bn_weights, bn_biases, running_means,
                                              running_vars, bins, training, eps)
    upsample_into(concat, branches, bins, x.shape[1])
    return concat, pooled, bn_input, mean, var


@_ppm.register_fake
def _(x, conv_weights, bn_weights, bn_biases, running_means, running_vars, bins, training, eps):
    n, c, h, w = x.shape
    r, acc = conv_weights[0].shape[0], acc_dtype(x.dtype)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    concat = torch.empty(n, c + len(bins) * r, h, w, dtype=x.dtype, device=x.device, memory_format=fmt)
    s = packed_size(bins)
    return (concat, x.new_empty(n, c, s), x.new_empty(n, r, s, dtype=acc), x.new_empty(len(bins), r, dtype=acc),
            x.new_empty(len(bins), r, dtype=acc))


@torch.library.custom_op("psp::pyramid_pooling_backward", mutates_args=())
def _ppm_backward(grad_concat: torch.Tensor, pooled: torch.Tensor, bn_input: torch.Tensor,
                  conv_weights: list[torch.Tensor], bn_weights: list[torch.Tensor], bn_biases: list[torch.Tensor],
                  mean: torch.Tensor, var: torch.Tensor, bins: Sequence[int], training: bool, eps: float,
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns grad_x [N, C, H, W] (channels_last as asked) and the stacked parameter gradients
    [nb, R, C], [nb, R], [nb, R] (accumulation dtype)."""
    bins, c = list(bins), pooled.shape[1]
    grad_branches = upsample_backward(grad_concat, bins, c)
    grad_pooled, *grads = reduction_backward(grad_branches, pooled, bn_input, conv_weights, bn_weights, bn_biases,
                                             mean, var, bins, training, eps)
    return (pool_backward_add(grad_pooled, bins, grad_concat[:, :c], channels_last), *grads)


@_ppm_backward.register_fake
def _(grad_concat, pooled, bn_input, conv_weights, bn_weights, bn_biases, mean, var, bins, training, eps,
      channels_last):
    n, c, _ = pooled.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = torch.empty(n, c, *grad_concat.shape[2:], dtype=grad_concat.dtype, device=grad_concat.device,
                         memory_format=fmt)
    return (grad_x, *param_grads_like(pooled, bn_input, conv_weights, bins)[1:])


def _setup_context(ctx, inputs, output):
    x, conv_weights, bn_weights, bn_biases, _, _, bins, training, eps = inputs
    _, pooled, bn_input, mean, var = output
    ctx.mark_non_differentiable(pooled, bn_input, mean, var)
    ctx.save_for_backward(pooled, bn_input, mean, var, *conv_weights, *bn_weights, *bn_biases)
    ctx.nb, ctx.bins, ctx.training, ctx.eps = len(bins), list(bins), training, eps
    ctx.channels_last = is_channels_last(x)


def _backward(ctx, grad_concat, _grad_pooled, _grad_bn_input, _grad_mean, _grad_var):
    (pooled, bn_input, mean, var), conv_weights, bn_weights, bn_biases = split_params(ctx)
    grad_x, *stacked = _ppm_backward(layout_for_kernels(grad_concat), pooled, bn_input, conv_weights, bn_weights,
                                     bn_biases, mean, var, ctx.bins, ctx.training, ctx.eps, ctx.channels_last)
    no_grad = [None] * ctx.nb  # running statistics are buffers
    return (grad_x, *unstack_grads(*stacked, conv_weights, bn_weights, bn_biases), no_grad, no_grad, None, None,
            None)


_ppm.register_autograd(_backward, setup_context=_setup_context)


def pyramid_pooling(x: torch.Tensor, conv_weights: Sequence[torch.Tensor], bn_weights: Sequence[torch.Tensor],
                    bn_biases: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                    running_vars: Sequence[torch.Tensor], bins: Sequence[int] = DEFAULT_BINS,
                    training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
                    num_batches_tracked: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """semseg's whole pyramid pooling module in three fused passes: pool, reduce (1x1 + BN + ReLU), upsample.

    Equal to ``upsample_concat(x, reduction_conv_bn_relu(multibin_avg_pool(x, bins), ...), bins)`` with fewer
    bytes moved (see the module docstring).

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, NCHW or channels_last (other strides are copied first).
        conv_weights: per bin the conv weight [R, C, 1, 1] (semseg ``features.{k}.1.weight``).
        bn_weights, bn_biases, running_means, running_vars: per bin the BatchNorm tensors [R]
            (``features.{k}.2.*``), x's dtype or fp32.
        bins, training, momentum, eps, num_batches_tracked: as :func:`reduction_conv_bn_relu` (training uses
            batch statistics and updates the running ones in place exactly as ``nn.BatchNorm2d``).

    Returns:
        [N, C + len(bins)*R, H, W] in x's dtype and memory format: x, then every bin's branch upsampled
        bilinearly (align_corners=True), in ``bins`` order. Differentiable w.r.t. x, conv_weights, bn_weights,
        bn_biases; the backward is deterministic (no atomics).

    Raises:
        TypeError / ValueError / RuntimeError: a bad argument (the message names it); ValueError "Expected
            more than 1 value per channel when training" as BatchNorm.

    Source: Zhao et al., CVPR 2017, Sec. 3.2; hszhao/semseg ``model/pspnet.py`` (``PPM``).
    """
    bins = check_bins(bins)
    check_tensor(x, "x", 4)
    n, c = x.shape[:2]
    conv_weights, per_channel = check_branch_params(n, c, x.device, bins, training, conv_weights, bn_weights,
                                                    bn_biases, running_means, running_vars)
    out, _, _, mean, var = _ppm(layout_for_kernels(x), conv_weights, *per_channel, bins, training, eps)
    if training:
        update_running_stats(mean, var, per_channel[2], per_channel[3], num_batches_tracked, momentum,
                             [n * b * b for b in bins])
    return out
