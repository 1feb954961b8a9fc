"""Backbone convolution ops. ``psp::folded_conv`` (inference): a convolution with its epilogue,
``relu?(conv(x) + bias + residual?)``, in one pass, BatchNorm folded into weight and bias
(``psp_kernels.nn.conv.fold_bn``). ``psp::training_conv`` (training): the conv's BatchNorm batch statistics
taken in its epilogue and BatchNorm + residual + ReLU in one pass; ``psp::training_conv_bn_backward`` its
BatchNorm + residual + ReLU backward in one op. Both backwards end in ``psp::folded_conv_backward``, ATen's
convolution backward.

Kernels (``psp_kernels.dispatch.KERNEL_TABLE``): ``csrc/cpu/conv.cpp`` (oneDNN's convolution with the
epilogue in place; bf16: the epilogue as oneDNN post-ops), ``psp_kernels/triton/conv.py`` (implicit GEMM with the epilogue), ``csrc/cuda/conv.cu``
(CUTLASS), ``psp_kernels.eager`` (cuDNN / oneDNN in x's dtype; the convolution backward),
``psp_kernels.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import eager, reference
from ..batchnorm import update_running_stats
from ..dispatch import define
from ..geometry import acc_dtype, conv_output_size, is_channels_last
from .checks import check_tensor

_CONV_ARGS = "int stride, int padding, int dilation, bool relu"
_conv = define("folded_conv", f"(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, {_CONV_ARGS}) -> Tensor",
               reference.folded_conv)
_conv_backward = define(
    "folded_conv_backward",
    f"(Tensor grad_out, Tensor x, Tensor weight, Tensor out, {_CONV_ARGS}, bool[] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    eager.folded_conv_backward)
_train = define(
    "training_conv",
    f"(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor? residual, {_CONV_ARGS}, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    reference.training_conv)
_bn_backward = define(
    "training_conv_bn_backward",
    "(Tensor grad_out, Tensor bn_input, Tensor out, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
    "bool relu, float eps, bool has_residual) -> (Tensor, Tensor, Tensor)",
    reference.training_conv_bn_backward)


@_conv.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, relu):
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(n, o, conv_output_size(h, kh, stride, padding, dilation),
                       conv_output_size(w, kw, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


@_conv_backward.register_fake
def _(grad_out, x, weight, out, stride, padding, dilation, relu, output_mask):
    shapes = (x, weight, weight.new_empty(weight.shape[0]), grad_out)
    return tuple(torch.empty_like(t) if m else x.new_empty(0) for t, m in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.args = (stride, padding, dilation, relu)
    ctx.has = (bias is not None, residual is not None)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has[0], need[3] and ctx.has[1]]
    gx, gw, gb, gr = _conv_backward(grad_out, x, weight, out, *ctx.args, mask)
    return (gx if mask[0] else None, gw.to(ctx.dtypes[0]) if mask[1] else None,
            gb.to(ctx.dtypes[1]) if mask[2] else None, gr if mask[3] else None, None, None, None, None)


_conv.register_autograd(_backward, setup_context=_setup_context)


def folded_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 0, dilation: int = 1,
                relu: bool = True) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride, padding, dilation) + residual?)`` in one pass: a backbone conv
    in inference, BatchNorm folded into ``weight`` and ``bias``.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, channels_last (the fast layout) or NCHW.
        weight: [O, C, k, k] (square kernel, groups 1), x's dtype or fp32; channels_last gives unit-stride reads.
        bias: [O] or None (with BatchNorm folded in: ``bn_bias - mean * bn_weight / sqrt(var + eps)``).
        residual: [N, O, Ho, Wo] or None, added before the ReLU (a bottleneck's shortcut).
        stride, padding, dilation: the conv's, the same on both axes (zero padding).
        relu: apply ReLU last (NaN-propagating, as ``torch.relu``).

    Returns:
        [N, O, Ho, Wo] in x's dtype and memory format, ``Ho = (H + 2 padding - dilation (k - 1) - 1) // stride + 1``
        (``geometry.conv_output_size``). Differentiable w.r.t. x, weight, bias and residual (ATen's
        convolution backward); bitwise deterministic forward.

    Raises:
        TypeError / ValueError / RuntimeError: a wrong rank, shape, dtype or device, naming the argument.

    Source: semseg ``model/resnet.py`` (conv, bn, relu, ``out += residual``); docs/kernels.md (folding).
    """
    _check_conv(x, weight, bias, residual, stride, padding, dilation)
    return _conv(x, weight, bias, residual, stride, padding, dilation, relu)


def _check_conv(x, weight, bias, residual, stride, padding, dilation) -> tuple[int, int]:
    """The argument checks shared by :func:`folded_conv` and :func:`training_conv`; returns the output
    size (Ho, Wo)."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4, x.device)
    n, c, h, w = x.shape
    o, wc, kh, kw = weight.shape
    if wc != c or kh != kw:
        raise ValueError(f"weight must be [O, {c}, k, k] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    ho, wo = conv_output_size(h, kh, stride, padding, dilation), conv_output_size(w, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"the {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit x of size "
                         f"{h}x{w}")
    if bias is not None:
        check_tensor(bias, "bias", 1, x.device)
        if bias.shape[0] != o:
            raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor(residual, "residual", 4, x.device)
        if tuple(residual.shape) != (n, o, ho, wo):
            raise ValueError(f"residual must have shape {(n, o, ho, wo)}, got {tuple(residual.shape)}")
    if x.dtype == torch.float64 and weight.dtype != torch.float64:
        raise TypeError(f"weight must be float64 for float64 x, got {weight.dtype}")
    return ho, wo


# --------------------------------------------------------------------------------------------------
# Training: conv with batch statistics from its epilogue, then BatchNorm + residual + ReLU in one pass.
# --------------------------------------------------------------------------------------------------

@_train.register_fake
def _(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, relu, eps):
    out = _conv(x, weight, None, None, stride, padding, dilation, relu)   # the fake kernel of the inference op
    stat = x.new_empty(weight.shape[0], dtype=acc_dtype(x.dtype))
    return out, torch.empty_like(out), stat, torch.empty_like(stat)


@_bn_backward.register_fake
def _(grad_out, bn_input, out, bn_weight, bn_bias, mean, var, relu, eps, has_residual):
    grad_res = (torch.empty_like(bn_input, dtype=grad_out.dtype) if has_residual
                else bn_input.new_empty(0, dtype=grad_out.dtype))
    return torch.empty_like(bn_input), grad_res, mean.new_empty(2, mean.shape[0])


def _train_setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, relu, eps = inputs
    out, bn_input, mean, var = output
    ctx.mark_non_differentiable(bn_input, mean, var)
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, bn_input, out, mean, var)
    ctx.args = (stride, padding, dilation, relu, eps, residual is not None)


def _train_backward(ctx, grad_out, _grad_bn_input, _grad_mean, _grad_var):
    x, weight, bn_weight, bn_bias, bn_input, out, mean, var = ctx.saved_tensors
    stride, padding, dilation, relu, eps, has_res = ctx.args
    need = ctx.needs_input_grad
    grad_y, grad_res, grad_bn = _bn_backward(grad_out, bn_input, out, bn_weight, bn_bias, mean, var, relu, eps,
                                             has_res)
    gx, gw, _, _ = _conv_backward(grad_y, x, weight, bn_input, stride, padding, dilation, False,
                                  [need[0], need[1], False, False])
    return (gx if need[0] else None, gw.to(weight.dtype) if need[1] else None, grad_bn[0].to(bn_weight.dtype),
            grad_bn[1].to(bn_bias.dtype), grad_res if has_res and need[4] else None, None, None, None, None, None)


_train.register_autograd(_train_backward, setup_context=_train_setup_context)


def training_conv(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                  running_mean: torch.Tensor, running_var: torch.Tensor, residual: Optional[torch.Tensor] = None,
                  stride: int = 1, padding: int = 0, dilation: int = 1, relu: bool = True,
                  momentum: float | None = 0.1, eps: float = 1e-5,
                  num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu?(batch_norm_train(conv2d(x, weight)) + residual?)``: a backbone conv + BatchNorm (+ shortcut) +
    ReLU in training, the batch statistics taken in the conv's epilogue (no extra read of the conv output)
    and BatchNorm + residual + ReLU in one pass; updates the running statistics in place exactly as
    ``nn.BatchNorm2d`` in training.

    Args:
        x, weight, residual, stride, padding, dilation, relu: as :func:`folded_conv` (the conv has no bias).
        bn_weight, bn_bias, running_mean, running_var: the BatchNorm tensors [O], x's dtype or fp32.
        momentum: running-average factor; ``None`` uses the cumulative average 1/num_batches_tracked.
        eps: added to the variance. num_batches_tracked: the int64 counter to increment (optional).

    Returns:
        [N, O, Ho, Wo] in x's dtype and memory format. Differentiable w.r.t. x, weight, bn_weight, bn_bias and
        residual: BatchNorm + ReLU backward in one op (two passes over the gradient), then ATen's convolution
        backward. Saved for backward: x, the conv output and the output. Deterministic (no atomics).

    Raises:
        TypeError / ValueError / RuntimeError: as :func:`folded_conv`, naming the argument; ValueError
            "Expected more than 1 value per channel when training" as BatchNorm.

    Source: semseg ``model/resnet.py`` (conv, bn, relu); docs/kernels.md (statistics in the epilogue).
    """
    ho, wo = _check_conv(x, weight, None, residual, stride, padding, dilation)
    o = weight.shape[0]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_tensor(t, name, 1, x.device)
        if t.shape[0] != o:
            raise ValueError(f"{name} must have shape ({o},), got {tuple(t.shape)}")
    count = x.shape[0] * ho * wo
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} for x of shape "
                         f"{tuple(x.shape)}")
    out, _, mean, var = _train(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, relu, eps)
    update_running_stats(mean[None], var[None], [running_mean], [running_var],
                         None if num_batches_tracked is None else [num_batches_tracked], momentum, [count])
    return out
