"""``psp::conv_bias_act``: a backbone convolution with its inference epilogue, ``relu?(conv(x) + bias +
residual?)``, in one pass (BatchNorm folded into weight and bias by ``psp_kernels.conv.fold_bn``).

Kernels: ``psp_kernels/triton/conv.py`` (CUDA: implicit GEMM with the epilogue), and for CPU tensors
``psp_kernels.reference.conv_bias_act`` (oneDNN's convolution, residual add and ReLU in place). The
backward is ATen's convolution backward (``reference.conv_bias_act_backward``) for every backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import resolve
from ._checks import check_tensor


def _backend(device: torch.device):
    """The chosen backend when it has a conv kernel; else Triton for CUDA tensors and the reference (ATen,
    oneDNN) for CPU tensors."""
    backend = resolve(device)
    if hasattr(backend, "conv_bias_act"):
        return backend
    return resolve(device, "triton" if device.type == "cuda" else "reference")


@torch.library.custom_op("psp::conv_bias_act", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    return _backend(x.device).conv_bias_act(x, weight, bias, residual, stride, padding, dilation, relu)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@_conv.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, relu):
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return torch.empty(n, o, _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation),
                       dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("psp::conv_bias_act_backward", mutates_args=())
def _conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, stride: int,
                   padding: int, dilation: int, relu: bool, mask: list[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_residual); the entries ``mask`` leaves out are empty."""
    from .. import reference
    grads = reference.conv_bias_act_backward(grad_out, x, weight, out, stride, padding, dilation, relu, mask)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_conv_backward.register_fake
def _(grad_out, x, weight, out, stride, padding, dilation, relu, mask):
    shapes = (x, weight, weight.new_empty(weight.shape[0]), grad_out)
    return tuple(torch.empty_like(t) if m else x.new_empty(0) for t, m in zip(shapes, mask))


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


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 0, dilation: int = 1,
                  relu: bool = True) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride, padding, dilation) + residual?)`` in one pass.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, channels_last (the fast layout) or NCHW.
        weight: [O, C, k, k] (square kernel, groups 1), x's dtype or fp32; channels_last gives unit-stride reads.
        bias: [O] or None (with BatchNorm folded in: ``beta - mean * gamma / sqrt(var + eps)``).
        residual: [N, O, Ho, Wo] or None, added before the ReLU (a bottleneck's shortcut).
        stride, padding, dilation: the conv's, the same on both axes (zero padding).
        relu: apply ReLU last (NaN-propagating, as ``torch.relu``).

    Returns:
        [N, O, Ho, Wo] in x's dtype and memory format, ``Ho = (H + 2 padding - dilation (k - 1) - 1) // stride + 1``.
        Accumulation in fp32 (fp64 for fp64). Differentiable w.r.t. x, weight, bias and residual (ATen's
        convolution backward); bitwise deterministic forward.

    Raises:
        TypeError / ValueError / RuntimeError: a wrong rank, shape, dtype or device, naming the argument.

    Source: issue "dilated-convolution kernels"; performance.md §1 (dilated conv3x3) and §5 (DCONV-I).
    """
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4, x.device)
    n, c, h, w = x.shape
    o, wc, kh, kw = weight.shape
    if wc != c or kh != kw:
        raise ValueError(f"weight must be [O, {c}, k, k] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"the {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit x of size {h}x{w}")
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
    return _conv(x, weight, bias, residual, stride, padding, dilation, relu)
