"""``psp::multibin_avg_pool``: adaptive average pooling to every pyramid bin in one pass over x.

Schema, fake kernel, autograd and backend dispatch. Kernels: ``psp_kernels/triton/pooling.py`` (CUDA),
``csrc/cpu/pooling.cpp`` (CPU), ``psp_kernels.reference.pool_forward`` (oracle).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..backends import resolve
from ..geometry import DEFAULT_BINS, check_bins, is_channels_last, packed_size
from ._checks import check_tensor, layout_for_kernels


@torch.library.custom_op("psp::multibin_avg_pool", mutates_args=())
def _pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    return resolve(x.device).pool_forward(layout_for_kernels(x), list(bins))


@_pool.register_fake
def _(x, bins):
    return x.new_empty(x.shape[0], x.shape[1], packed_size(bins))


@torch.library.custom_op("psp::multibin_avg_pool_backward", mutates_args=())
def _pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                   channels_last: bool) -> torch.Tensor:
    return resolve(grad_pooled.device).pool_backward(grad_pooled.contiguous(), list(bins), height, width,
                                                     channels_last)


@_pool_backward.register_fake
def _(grad_pooled, bins, height, width, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(grad_pooled.shape[0], grad_pooled.shape[1], height, width, dtype=grad_pooled.dtype,
                       device=grad_pooled.device, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    x, bins = inputs
    ctx.bins = list(bins)
    ctx.size = (x.shape[2], x.shape[3])
    ctx.channels_last = is_channels_last(x)


def _backward(ctx, grad_pooled):
    return _pool_backward(grad_pooled, ctx.bins, *ctx.size, ctx.channels_last), None


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
    return _pool(x, bins)
