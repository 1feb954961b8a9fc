"""Eager ATen compositions in the input's dtype: what PyTorch itself runs for a kernel op.

These are the ``eager`` candidates of :data:`psp_kernels.dispatch.KERNEL_TABLE`: the backbone
convolutions through cuDNN (CUDA) or oneDNN in x's own dtype, which the reference does not do (it
convolves in the accumulation dtype, exact but slower in fp16/bf16), and the convolution backward of
every device. Each function has its op's schema.

Source: semseg ``model/resnet.py`` (conv, BatchNorm, ``out += residual``, ReLU); ATen's
``convolution_backward``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import is_channels_last
from .reference import batch_norm_residual_relu


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
          dilation: int) -> torch.Tensor:
    return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation)


def folded_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias) + residual?)`` with the conv in x's dtype (cuDNN / oneDNN), then the
    residual add and ReLU in place; x's memory format."""
    y = _conv(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def training_conv(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                  residual: torch.Tensor | None, stride: int, padding: int, dilation: int, relu: bool, eps: float):
    """The reference's :func:`~psp_kernels.reference.training_conv` with the conv in x's dtype."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    y = _conv(x, weight, None, stride, padding, dilation).contiguous(memory_format=fmt)
    return batch_norm_residual_relu(y, bn_weight, bn_bias, residual, relu, eps)


def folded_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                         stride: int, padding: int, dilation: int, relu: bool, output_mask: Sequence[bool]):
    """Gradient of ``folded_conv``: ``(grad_x, grad_weight, grad_bias, grad_residual)``, the ones
    ``output_mask`` (x, weight, bias, residual) leaves out empty. The ReLU mask is ``out > 0``;
    ``grad_residual`` is the gradient of the conv's output (grad_out's dtype); the conv gradients are ATen's
    ``convolution_backward`` in x's dtype."""
    grad_z = torch.where(out > 0, grad_out, 0) if relu else grad_out
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_z.to(x.dtype), x, weight.to(x.dtype), [weight.shape[0]] if output_mask[2] else None, [stride] * 2,
        [padding] * 2, [dilation] * 2, False, [0, 0], 1, [bool(m) for m in output_mask[:3]])
    grad_residual = (grad_z if relu else grad_z.clone()) if output_mask[3] else None
    return tuple(g if g is not None else x.new_empty(0) for g in (gx, gw, gb, grad_residual))
