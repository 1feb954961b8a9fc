"""``psp::add_branch_bn_relu``: the concat-free head's epilogue, ``relu(bn(conv_out + branch_rows @ width_interp^T))``
in one op.

``conv_out`` is the x-half 3x3 conv's output; ``branch_rows @ width_interp^T`` per (n, o, h) row is the
branch term's last, W-axis interpolation (``psp_kernels.nn.head.branch_factors``), formed inside the kernel
and never stored at full resolution. The op is functional: it returns the statistics it normalised with,
and :func:`add_branch_bn_relu` updates the running statistics from them exactly as ``nn.BatchNorm2d``. Only
BatchNorm's input is saved for backward (the ReLU mask is recomputed from it), not the output. Kernels
(``psp_kernels.dispatch.KERNEL_TABLE``): ``csrc/cpu/head.cpp``, ``psp_kernels/triton/head.py``,
``psp_kernels.reference``.
"""

from __future__ import annotations

import torch

from .. import reference
from ..batchnorm import update_running_stats
from ..dispatch import define
from ..geometry import acc_dtype
from .checks import check_tensor, layout_for_kernels

_head = define(
    "add_branch_bn_relu",
    "(Tensor conv_out, Tensor branch_rows, Tensor width_interp, Tensor bn_weight, Tensor bn_bias, "
    "Tensor running_mean, Tensor running_var, bool training, float eps, bool keep_bn_input) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    reference.add_branch_bn_relu)
_head_backward = define(
    "add_branch_bn_relu_backward",
    "(Tensor grad_out, Tensor bn_input, Tensor width_interp, Tensor bn_weight, Tensor bn_bias, Tensor mean, "
    "Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)",
    reference.add_branch_bn_relu_backward)


@_head.register_fake
def _(conv_out, branch_rows, width_interp, bn_weight, bn_bias, running_mean, running_var, training, eps,
      keep_bn_input):
    acc = acc_dtype(conv_out.dtype)
    o = conv_out.shape[1]
    conv_out = layout_for_kernels(conv_out)
    bn_input = torch.empty_like(conv_out) if training or keep_bn_input else conv_out.new_empty(0)
    return torch.empty_like(conv_out), bn_input, conv_out.new_empty(o, dtype=acc), conv_out.new_empty(o, dtype=acc)


@_head_backward.register_fake
def _(grad_out, bn_input, width_interp, bn_weight, bn_bias, mean, var, training, eps):
    n, o, h, _ = bn_input.shape
    acc = acc_dtype(bn_input.dtype)
    return (torch.empty_like(bn_input), bn_input.new_empty(n, o, h, width_interp.shape[1], dtype=acc),
            bn_input.new_empty(2, o, dtype=acc))


def _setup_context(ctx, inputs, output):
    _, _, width_interp, bn_weight, bn_bias, _, _, training, eps, _ = inputs
    _, bn_input, mean, var = output
    ctx.mark_non_differentiable(bn_input, mean, var)
    ctx.save_for_backward(bn_input, width_interp, bn_weight, bn_bias, mean, var)
    ctx.training, ctx.eps = training, eps


def _backward(ctx, grad_out, _grad_bn_input, _grad_mean, _grad_var):
    bn_input, width_interp, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    if bn_input.numel() == 0:
        raise RuntimeError("psp::add_branch_bn_relu: backward through a call made with keep_bn_input=False "
                           "(BatchNorm's input was not kept)")
    grad_conv_out, grad_branch_rows, grad_bn = _head_backward(layout_for_kernels(grad_out), bn_input, width_interp,
                                                              bn_weight, bn_bias, mean, var, ctx.training, ctx.eps)
    return (grad_conv_out, grad_branch_rows, None, grad_bn[0].to(bn_weight.dtype), grad_bn[1].to(bn_bias.dtype),
            None, None, None, None, None)


_head.register_autograd(_backward, setup_context=_setup_context)


def add_branch_bn_relu(conv_out: torch.Tensor, branch_rows: torch.Tensor, width_interp: torch.Tensor,
                       bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor, training: bool = False, momentum: float | None = 0.1,
                       eps: float = 1e-5, num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(batch_norm(conv_out + branch_rows @ width_interp^T))``: add the branch term, BatchNorm, ReLU in
    one fused op.

    Args:
        conv_out: [N, O, H, W] fp16/bf16/fp32/fp64, NCHW or channels_last (the x-half conv's output).
        branch_rows: [N, O, H, K] in the accumulation dtype (fp32; fp64 for fp64 conv_out): the branch term
            before its W-axis interpolation (``psp_kernels.nn.head.branch_factors``).
        width_interp: [W, K], branch_rows' dtype: the W-axis interpolation weights (no gradient flows to it).
        bn_weight, bn_bias, running_mean, running_var: the BatchNorm tensors [O], conv_out's dtype or fp32.
        training: batch statistics (biased variance normalises) and an in-place update of the running
            statistics (unbiased variance) and ``num_batches_tracked`` exactly as ``nn.BatchNorm2d``;
            otherwise the running statistics normalise and nothing is modified.
        momentum: running-average factor; ``None`` uses the cumulative average 1/num_batches_tracked.
        eps: added to the variance.
        num_batches_tracked: the int64 counter to increment in training (optional).

    Returns:
        [N, O, H, W] in conv_out's dtype and memory format. Differentiable w.r.t. conv_out, branch_rows,
        bn_weight, bn_bias; deterministic (no atomics). Saved for backward: BatchNorm's input
        ``conv_out + branch_rows @ width_interp^T`` (one tensor of conv_out's size).

    Raises:
        TypeError / ValueError / RuntimeError: a wrong rank, shape, dtype or device (the message names the
            argument); ValueError "Expected more than 1 value per channel when training" as BatchNorm.

    Source: docs/concat_free_head.md; hszhao/semseg ``model/pspnet.py`` (``cls.0``-``cls.2``).
    """
    check_tensor(conv_out, "conv_out", 4)
    n, o, h, w = conv_out.shape
    acc = acc_dtype(conv_out.dtype)
    check_tensor(branch_rows, "branch_rows", 4, conv_out.device)
    if tuple(branch_rows.shape[:3]) != (n, o, h) or branch_rows.dtype != acc:
        raise ValueError(f"branch_rows must be [{n}, {o}, {h}, K] of dtype {acc} for conv_out of shape "
                         f"{tuple(conv_out.shape)}, got {tuple(branch_rows.shape)} {branch_rows.dtype}")
    check_tensor(width_interp, "width_interp", 2, conv_out.device)
    if tuple(width_interp.shape) != (w, branch_rows.shape[3]) or width_interp.dtype != acc:
        raise ValueError(f"width_interp must be [{w}, {branch_rows.shape[3]}] of dtype {acc}, got "
                         f"{tuple(width_interp.shape)} {width_interp.dtype}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_tensor(t, name, 1, conv_out.device)
        if t.shape[0] != o:
            raise ValueError(f"{name} must have shape ({o},), got {tuple(t.shape)}")
    if training and n * h * w == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {conv_out.shape}")
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (conv_out, branch_rows, bn_weight, bn_bias))
    out, _, mean, var = _head(layout_for_kernels(conv_out), branch_rows.contiguous(), width_interp.contiguous(),
                              bn_weight, bn_bias, running_mean, running_var, training, eps, keep)
    if training:
        update_running_stats(mean[None], var[None], [running_mean], [running_var],
                             None if num_batches_tracked is None else [num_batches_tracked], momentum, [n * h * w])
    return out
