"""``psp::upsample_concat``: x and every branch's bilinear upsampling written into one concat buffer.

The op, its fake kernel and autograd, and the kernel ops it runs on: ``psp::upsample_concat``, its
backward, and the whole-PPM op's ``upsample_into`` (writes only the branch channels of a concat buffer
that already holds x). Kernels (``psp_kernels.dispatch.KERNEL_TABLE``): ``csrc/cpu/upsample.cpp``,
``psp_kernels/triton/upsample.py``, ``csrc/cuda/upsample.cu``, ``psp_kernels.reference``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from ..dispatch import define
from ..geometry import DEFAULT_BINS, check_bins, is_channels_last, packed_size
from .checks import check_tensor, layout_for_kernels

_upsample = define("upsample_concat", "(Tensor x, Tensor branches, int[] bins) -> Tensor", reference.upsample_concat)
upsample_backward = define("upsample_concat_backward", "(Tensor grad_out, int[] bins, int channels) -> Tensor",
                           reference.upsample_concat_backward)
upsample_into = define("upsample_into", "(Tensor(a!) concat, Tensor branches, int[] bins, int channels) -> ()",
                       reference.upsample_into, mutates_args=("concat",))


@_upsample.register_fake
def _(x, branches, bins):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    n, c, h, w = x.shape
    return torch.empty(n, c + len(bins) * branches.shape[1], h, w, dtype=x.dtype, device=x.device,
                       memory_format=fmt)


@upsample_backward.register_fake
def _(grad_out, bins, channels):
    n, total = grad_out.shape[:2]
    return grad_out.new_empty(n, (total - channels) // len(bins), packed_size(bins))


@upsample_into.register_fake
def _(concat, branches, bins, channels):
    return None


def _setup_context(ctx, inputs, output):
    x, _, bins = inputs
    ctx.bins, ctx.channels = list(bins), x.shape[1]


def _backward(ctx, grad_out):
    grad_branches = None
    if ctx.needs_input_grad[1]:
        grad_branches = upsample_backward(layout_for_kernels(grad_out), ctx.bins, ctx.channels)
    return grad_out[:, :ctx.channels], grad_branches, None


_upsample.register_autograd(_backward, setup_context=_setup_context)


def upsample_concat(x: torch.Tensor, branches: torch.Tensor, bins: Sequence[int] = DEFAULT_BINS) -> torch.Tensor:
    """Concatenate x with every branch upsampled bilinearly to x's size, in one pass.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32/fp64, NCHW or channels_last.
        branches: packed branches [N, R, S] (from :func:`reduction_conv_bn_relu`), x's dtype and device.
        bins: the bin sizes the branches were made with.

    Returns:
        [N, C + len(bins) * R, H, W] in x's dtype and memory format: channels ``[0, C)`` are x, then each
        bin's R channels in ``bins`` order, upsampled with ``align_corners=True`` (semseg). Interpolation
        runs in fp32 (fp64). The backward's grad_x is the pass-through slice of the incoming gradient;
        the branches' gradient is a deterministic transposed interpolation (no atomics).

    Raises:
        TypeError / ValueError / RuntimeError: wrong rank, dtype, shape or device (the message names
            the argument); bad ``bins``.

    Source: hszhao/semseg ``model/pspnet.py`` (``PPM.forward``: interpolate + cat, x first).
    """
    bins = check_bins(bins)
    check_tensor(x, "x", 4)
    check_tensor(branches, "branches", 3, x.device)
    if branches.dtype != x.dtype:
        raise TypeError(f"branches must have x's dtype {x.dtype}, got {branches.dtype}")
    if branches.shape[0] != x.shape[0] or branches.shape[2] != packed_size(bins):
        raise ValueError(f"branches must have shape [N={x.shape[0]}, R, S={packed_size(bins)}] for bins {bins}, "
                         f"got {tuple(branches.shape)}")
    return _upsample(layout_for_kernels(x), branches.contiguous(), bins)
