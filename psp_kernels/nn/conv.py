"""Backbone conv + BatchNorm (+ residual) + ReLU as fused ops, on the modules' own parameters.

Inference: BatchNorm is the affine map ``z * s + (bn_bias - mean * s)`` with ``s = bn_weight / sqrt(var + eps)``,
so ``bn(conv(x; w)) = conv(x; w * s) + (bn_bias - mean * s)``: one convolution with a bias, whose epilogue also
adds the residual and applies ReLU (:func:`psp_kernels.ops.folded_conv`). The folded weights are cached
per (conv, BatchNorm) pair and rebuilt when a parameter or running statistic changes (version counters and
storage), so inference pays for folding once.

Training on a GPU: :func:`psp_kernels.ops.training_conv` takes BatchNorm's batch statistics in the conv's
epilogue and applies BatchNorm + residual + ReLU in one pass (running statistics updated as
``nn.BatchNorm2d``). Training on CPU, a SyncBatchNorm across processes, and pairs the ops do not cover run
the modules as they are. The modules keep their parameters, so semseg's state_dict keys are unchanged.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..batchnorm import syncs_statistics
from ..geometry import is_channels_last, memory_format
from ..ops.conv import folded_conv, training_conv

__all__ = ["fold_bn", "foldable", "fused_conv_bn", "fused_conv_bn_sequence"]

_FOLDED: "weakref.WeakKeyDictionary[nn.Conv2d, tuple]" = weakref.WeakKeyDictionary()


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn(conv(x))`` in eval mode is one :func:`folded_conv`: a 2-D conv with a square kernel,
    equal stride / padding / dilation on both axes, zero padding and groups 1, followed by a BatchNorm with
    running statistics."""
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1] and conv.dilation[0] == conv.dilation[1]
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels)


def fold_bn(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode ``bn(conv(.))`` as one conv: ``(weight * s, bn_bias - mean * s + bias * s)``.

    Args:
        conv: a conv :func:`foldable` with ``bn``; bn: its BatchNorm (affine or not).
    Returns:
        weight [O, C, k, k] in the conv weight's dtype and memory format, bias [O] in the BatchNorm's dtype
        (fp32 for an fp32 BatchNorm). Differentiable w.r.t. every parameter (autograd through the fold).
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.to(conv.weight.dtype)[:, None, None, None], shift


def _state(conv: nn.Conv2d, bn: _BatchNorm) -> tuple:
    tensors = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors if t is not None) + (bn.eps,)


def _cached_fold(conv: nn.Conv2d, bn: _BatchNorm, layout: torch.memory_format,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fold_bn` with the weight in ``layout`` and ``dtype`` (the input's: oneDNN / cuDNN would convert
    it per call; under autocast the kernel rounds it to x's dtype anyway, as autocast does for conv2d), cached
    until a parameter, running statistic, the layout or the dtype changes."""
    key = _state(conv, bn) + (layout, dtype)
    hit = _FOLDED.get(conv)
    if hit is None or hit[0] != key or hit[1] is not bn:
        with torch.no_grad():
            weight, bias = fold_bn(conv, bn)
            weight = weight.to(dtype).contiguous(memory_format=layout)
        hit = (key, bn, weight, bias)
        _FOLDED[conv] = hit
    return hit[2], hit[3]


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype when autocast is on (what it would do to conv2d's input), else x."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _trains_fused(x: torch.Tensor, conv: nn.Conv2d, bn: _BatchNorm) -> bool:
    """Training runs the fused ops on GPUs (on CPU it keeps ATen, oneDNN's training convolutions being the
    fast path there) for a foldable pair with affine BatchNorm and running statistics, a conv without bias,
    and a BatchNorm whose statistics are this process's (not a SyncBatchNorm across processes)."""
    return (x.device.type == "cuda" and foldable(conv, bn) and conv.bias is None and bn.affine
            and bn.track_running_stats and not syncs_statistics(bn))


def fused_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: _BatchNorm, relu: bool = True,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu?(bn(conv(x)) + residual?)``: in eval mode one fused op with BatchNorm folded in (a
    :func:`foldable` pair); in training on a GPU the fused training op (statistics from the conv's epilogue,
    one BatchNorm + residual + ReLU pass); the modules themselves otherwise. Training uses batch statistics and
    updates the running statistics exactly as ``nn.BatchNorm2d``.

    Args:
        x: [N, C, H, W] (channels_last is the fast layout); conv, bn: the layer pair; relu: apply ReLU last;
        residual: [N, O, Ho, Wo] added before the ReLU, or None.
    Returns:
        [N, O, Ho, Wo] in x's dtype (under autocast: its dtype, as conv2d) and, on the fused path, x's memory
        format. The folded weights are cached while no gradient is needed (e.g. under ``torch.no_grad``);
        with gradients, and under ``torch.compile`` (which folds constants itself), they are folded per call.

    Source: semseg ``model/resnet.py`` (``Bottleneck.forward``: conv, bn, relu, ``out += residual``).
    """
    if bn.training and _trains_fused(x, conv, bn):
        x = _autocast_input(x)
        return training_conv(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, residual,
                             conv.stride[0], conv.padding[0], conv.dilation[0], relu, bn.momentum, bn.eps,
                             bn.num_batches_tracked)
    if bn.training or not foldable(conv, bn):
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y
    x = _autocast_input(x)
    params = [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        weight, bias = fold_bn(conv, bn)
    else:
        weight, bias = _cached_fold(conv, bn, memory_format(is_channels_last(x)),
                                    x.dtype if torch.is_autocast_enabled(x.device.type) else conv.weight.dtype)
    return folded_conv(x, weight, bias, residual, conv.stride[0], conv.padding[0], conv.dilation[0], relu)


def fused_conv_bn_sequence(modules: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``modules`` with every (conv, BatchNorm[, ReLU]) run of consecutive modules as one
    :func:`fused_conv_bn` (semseg's ``layer0`` stem and ``downsample`` blocks); other modules run as they are."""
    mods = list(modules)
    i = 0
    while i < len(mods):
        if i + 1 < len(mods) and isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], _BatchNorm):
            relu = i + 2 < len(mods) and isinstance(mods[i + 2], nn.ReLU)
            x = fused_conv_bn(x, mods[i], mods[i + 1], relu=relu)
            i += 3 if relu else 2
        else:
            x = mods[i](x)
            i += 1
    return x
