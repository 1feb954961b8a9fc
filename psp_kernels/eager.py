"""Eager ATen compositions in the input's dtype: what PyTorch itself runs for a kernel op.

These are the ``eager`` candidates of :data:`psp_kernels.dispatch.KERNEL_TABLE`, the unfused modules' own
ATen calls where they differ from the reference (which computes in the accumulation dtype: exact, but on
16-bit inputs it reads and writes fp32 copies):

- the pyramid pooling's passes over x-sized maps: ``adaptive_avg_pool2d`` per bin and its backward,
  ``interpolate`` (bilinear, align_corners) per bin and its backward, the concat, in the map's dtype, the
  per-bin gradients summed in that dtype as autograd sums them (semseg's ``PPM``);
- the backbone convolutions through cuDNN (CUDA) or oneDNN in x's own dtype, and the convolution backward
  of every device (semseg's ``model/resnet.py``: conv, BatchNorm, ``out += residual``, ReLU).

The per-bin 1x1 reduction convs and the head's epilogue work on bin-sized tensors or on accumulation-dtype
inputs; there the reference is already the ATen composition, and no eager twin is listed. Each function has
its op's schema.

Source: hszhao/semseg ``model/pspnet.py`` (``PPM``), ``model/resnet.py``; ATen's ``convolution_backward``,
``_adaptive_avg_pool2d_backward``, ``upsample_bilinear2d_backward``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import bin_offsets, is_channels_last, memory_format
from .reference import batch_norm_residual_relu, concat_buffer


# --------------------------------------------------------------------------------------------------
# Pyramid pooling (contracts: psp_kernels/reference.py)
# --------------------------------------------------------------------------------------------------

def multibin_avg_pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, b)`` per bin in x's dtype, packed: [N, C, S]."""
    return torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], dim=2)


def multibin_avg_pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                               channels_last: bool) -> torch.Tensor:
    """ATen's adaptive-average-pooling backward per bin, summed in grad_pooled's dtype: [N, C, H, W]."""
    n, c, _ = grad_pooled.shape
    like = grad_pooled.new_empty(n, c, height, width).contiguous(memory_format=memory_format(channels_last))
    grad = None
    for b, off in zip(bins, bin_offsets(bins)):
        g = torch.ops.aten._adaptive_avg_pool2d_backward(grad_pooled[:, :, off:off + b * b].reshape(n, c, b, b),
                                                         like)
        grad = g if grad is None else grad.add_(g)
    return grad.contiguous(memory_format=memory_format(channels_last))


def multibin_avg_pool_with_concat(x: torch.Tensor, bins: Sequence[int], total_channels: int):
    """``(multibin_avg_pool(x), concat)``, concat holding x in its first C channels."""
    return multibin_avg_pool(x, bins), concat_buffer(x, total_channels)


def multibin_avg_pool_backward_add(grad_pooled: torch.Tensor, bins: Sequence[int], residual: torch.Tensor,
                                   channels_last: bool) -> torch.Tensor:
    """``residual + multibin_avg_pool_backward(grad_pooled)`` in grad_pooled's dtype."""
    _, _, h, w = residual.shape
    grad = multibin_avg_pool_backward(grad_pooled, bins, h, w, channels_last).add_(residual)
    return grad.contiguous(memory_format=memory_format(channels_last))


def _upsampled(branches: torch.Tensor, bins: Sequence[int], size, dtype: torch.dtype):
    """Each bin's branches [N, R, b, b] upsampled to ``size`` (bilinear, align_corners=True) in ``dtype``."""
    n, r, _ = branches.shape
    return [F.interpolate(branches[:, :, off:off + b * b].reshape(n, r, b, b).to(dtype), size=size,
                          mode="bilinear", align_corners=True) for b, off in zip(bins, bin_offsets(bins))]


def upsample_concat(x: torch.Tensor, branches: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """``cat([x, interpolate(branch_b) ...])`` in x's dtype and memory format."""
    out = torch.cat([x, *_upsampled(branches, bins, x.shape[2:], x.dtype)], dim=1)
    return out.contiguous(memory_format=memory_format(is_channels_last(x)))


def upsample_concat_backward(grad_out: torch.Tensor, bins: Sequence[int], channels: int) -> torch.Tensor:
    """ATen's bilinear-upsampling backward per bin in grad_out's dtype, packed: [N, R, S]."""
    n, total, h, w = grad_out.shape
    r = (total - channels) // len(bins)
    grads = [torch.ops.aten.upsample_bilinear2d_backward(
        grad_out[:, channels + k * r: channels + (k + 1) * r], [h, w], [n, r, b, b], True).reshape(n, r, b * b)
        for k, b in enumerate(bins)]
    return torch.cat(grads, dim=2)


def upsample_into(concat: torch.Tensor, branches: torch.Tensor, bins: Sequence[int], channels: int) -> None:
    """Each bin's upsampled branches written into ``concat[:, channels:]`` (concat's dtype), in place."""
    r = branches.shape[1]
    for k, up in enumerate(_upsampled(branches, bins, concat.shape[2:], concat.dtype)):
        concat[:, channels + k * r: channels + (k + 1) * r] = up


# --------------------------------------------------------------------------------------------------
# Backbone convolutions
# --------------------------------------------------------------------------------------------------


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
