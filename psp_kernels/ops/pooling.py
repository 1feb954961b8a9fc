"""``psp::multibin_avg_pool``: adaptive average pooling to every pyramid bin in one pass over x.

The op, its fake kernel and autograd, and the kernel ops it runs on: ``psp::multibin_avg_pool`` and its
backward, and the whole-PPM op's fused-pass variants (``multibin_avg_pool_with_concat`` copies x into the
concat buffer while pooling; ``multibin_avg_pool_backward_add`` adds x's pass-through gradient while
un-pooling). Kernels (``psp_kernels.dispatch.KERNEL_TABLE``): ``csrc/cpu/pooling.cpp``,
``psp_kernels/triton/pooling.py``, ``csrc/cuda/pooling.cu``, ``psp_kernels.reference``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from ..dispatch import define
from ..geometry import DEFAULT_BINS, check_bins, is_channels_last, packed_size
from .checks import check_tensor, layout_for_kernels

_pool = define("multibin_avg_pool", "(Tensor x, int[] bins) -> Tensor", reference.multibin_avg_pool)
_pool_backward = define(
    "multibin_avg_pool_backward",
    "(Tensor grad_pooled, int[] bins, int height, int width, bool channels_last) -> Tensor",
    reference.multibin_avg_pool_backward)
pool_with_concat = define(
    "multibin_avg_pool_with_concat", "(Tensor x, int[] bins, int total_channels) -> (Tensor, Tensor)",
    reference.multibin_avg_pool_with_concat)
pool_backward_add = define(
    "multibin_avg_pool_backward_add",
    "(Tensor grad_pooled, int[] bins, Tensor residual, bool channels_last) -> Tensor",
    reference.multibin_avg_pool_backward_add)


def _empty_map(like: torch.Tensor, n: int, c: int, height: int, width: int, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(n, c, height, width, dtype=like.dtype, device=like.device, memory_format=fmt)


@_pool.register_fake
def _(x, bins):
    return x.new_empty(x.shape[0], x.shape[1], packed_size(bins))


@_pool_backward.register_fake
def _(grad_pooled, bins, height, width, channels_last):
    return _empty_map(grad_pooled, *grad_pooled.shape[:2], height, width, channels_last)


@pool_with_concat.register_fake
def _(x, bins, total_channels):
    n, c, h, w = x.shape
    return x.new_empty(n, c, packed_size(bins)), _empty_map(x, n, total_channels, h, w, is_channels_last(x))


@pool_backward_add.register_fake
def _(grad_pooled, bins, residual, channels_last):
    return _empty_map(grad_pooled, *grad_pooled.shape[:2], *residual.shape[2:], channels_last)


def _setup_context(ctx, inputs, output):
    x, bins = inputs
    ctx.bins = list(bins)
    ctx.size = (x.shape[2], x.shape[3])
    ctx.channels_last = is_channels_last(x)


def _backward(ctx, grad_pooled):
    return _pool_backward(grad_pooled.contiguous(), ctx.bins, *ctx.size, ctx.channels_last), None


_pool.register_autograd(_backward, setup_context=_setup_context)


def multibin_avg_pool(x: torch.Tensor, bins: Sequence[int] = DEFAULT_BINS) -> torch.Tensor:
    """Adaptive average pooling of x to every bin size, all bins in one pass over x.

    Args:
        x: [N, C, H, W] float16/bfloat16/float32/float64, NCHW or channels_last (other strides are
            copied to contiguous first). Any H, W >= 1, also smaller than a bin.
        bins: pyramid output sizes (semseg: (1, 2, 3, 6)).

    Returns:
        Packed pooled tensor [N, C, S], S = sum(b*b), x's dtype; bin k's b x b grid is
        ``out[:, :, off_k:off_k + b*b]`` row-major (``psp_kernels.geometry.split_bins`` unpacks it).
        Equals ``cat([adaptive_avg_pool2d(x, b).flatten(2) for b in bins], 2)`` with nn.AdaptiveAvgPool2d's
        windows ``[floor(i*H/b), ceil((i+1)*H/b))``; sums accumulate in fp32 (fp64 for fp64).
        Differentiable; the backward is a deterministic gather (no atomics).

    Raises:
        TypeError / ValueError: x not a non-empty 4-D floating tensor; bad ``bins``.

    Source: Zhao et al., CVPR 2017, Sec. 3.2 (pyramid pooling); hszhao/semseg ``model/pspnet.py``.
    """
    bins = check_bins(bins)
    check_tensor(x, "x", 4)
    return _pool(layout_for_kernels(x), bins)
