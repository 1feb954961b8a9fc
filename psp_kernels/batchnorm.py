"""BatchNorm helpers shared by the fused ops and modules: the running-statistics update, per-bin parameter
gradients, and which BatchNorms the fused ops may compute.

The kernel ops are functional: they return the batch statistics they normalised with, and
:func:`update_running_stats` applies ``nn.BatchNorm2d``'s update to the module's buffers.

Source: ``torch.nn.BatchNorm2d`` (momentum, cumulative average, unbiased running variance).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def update_running_stats(mean: torch.Tensor, var: torch.Tensor, running_means: Sequence[torch.Tensor],
                         running_vars: Sequence[torch.Tensor],
                         num_batches_tracked: Optional[Sequence[torch.Tensor]], momentum: Optional[float],
                         counts: Sequence[int]) -> None:
    """``nn.BatchNorm2d``'s training update of every BatchNorm k, in place:
    ``r = (1 - m) * r + m * statistic`` with the unbiased variance ``counts[k] / (counts[k] - 1) * var[k]``.

    Args:
        mean, var: [nb, C] batch statistics (biased variance), accumulation dtype.
        running_means, running_vars: nb buffers [C], updated in place (their dtype kept).
        num_batches_tracked: nb int64 counters incremented in place, or None.
        momentum: the running-average factor; None uses the cumulative average 1 / num_batches_tracked
            (then ``num_batches_tracked`` is required).
        counts: values per channel of each BatchNorm (a PPM bin b: N*b*b; a conv output: N*Ho*Wo).
    """
    with torch.no_grad():
        if num_batches_tracked is not None:
            torch._foreach_add_(list(num_batches_tracked), 1)
        for k, (rm, rv) in enumerate(zip(running_means, running_vars)):
            m = momentum if momentum is not None else 1.0 / float(num_batches_tracked[k])
            rm.mul_(1.0 - m).add_(mean[k].to(rm.dtype), alpha=m)
            rv.mul_(1.0 - m).add_((var[k] * (counts[k] / (counts[k] - 1))).to(rv.dtype), alpha=m)


def as_param_grad(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` shaped, typed and strided as ``param`` (a channels_last 1x1 weight has other strides than a
    contiguous gradient, and DDP's gradient buckets require the parameter's exact strides)."""
    grad = grad.reshape(param.shape).to(param.dtype)
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def unstack_param_grads(stacked: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-bin gradients of a stacked ``[nb, ...]`` kernel result (a custom op returns one tensor, not a
    list of views), each shaped, typed and strided as its parameter."""
    return [as_param_grad(g, p) for g, p in zip(stacked.unbind(0), params)]


def syncs_statistics(bn: nn.Module) -> bool:
    """True for a ``SyncBatchNorm`` in training: its batch statistics span every process of the group,
    which the fused ops (statistics of this process's batch) do not compute, so the module itself must run
    (the fused modules then fall back to it for that BatchNorm only)."""
    return isinstance(bn, nn.SyncBatchNorm) and bn.training
