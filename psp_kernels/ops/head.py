"""``psp::head_bn_relu``: the concat-free head's epilogue, ``relu(bn(y + u @ bw^T))`` in one op.

y is the x-half 3x3 conv's output; ``u @ bw^T`` per (n, o, h) row is the branch term's last, W-axis
interpolation (``psp_kernels.head.branch_factors``), formed inside the kernel and never stored at full
resolution. The op is functional: it returns the statistics it normalised with, and
:func:`head_bn_relu` updates the running statistics from them exactly as ``nn.BatchNorm2d``. Only z, the
BatchNorm input, is saved for backward (the ReLU mask is recomputed from it), not the output.
Kernels: ``psp_kernels/triton/head.py`` (CUDA), ``csrc/cpu/head.cpp`` (CPU),
``psp_kernels.reference.head_forward`` / ``head_backward`` (oracle).
"""

from __future__ import annotations

import torch

from ..backends import resolve_for
from ..geometry import acc_dtype
from ._checks import check_tensor, layout_for_kernels
from .projection import update_running_stats


@torch.library.custom_op("psp::head_bn_relu", mutates_args=())
def _head(y: torch.Tensor, u: torch.Tensor, bw: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
          running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, eps: float, keep_z: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, z, mean, var); z is empty unless kept (training or keep_z)."""
    backend = resolve_for(y.device, "head_forward")
    return backend.head_forward(layout_for_kernels(y), u, bw, gamma, beta, running_mean, running_var, training, eps,
                                keep_z)


@_head.register_fake
def _(y, u, bw, gamma, beta, running_mean, running_var, training, eps, keep_z):
    acc = acc_dtype(y.dtype)
    o = y.shape[1]
    y = layout_for_kernels(y)
    z = torch.empty_like(y) if training or keep_z else y.new_empty(0)
    return torch.empty_like(y), z, y.new_empty(o, dtype=acc), y.new_empty(o, dtype=acc)


@torch.library.custom_op("psp::head_bn_relu_backward", mutates_args=())
def _head_backward(grad_out: torch.Tensor, z: torch.Tensor, bw: torch.Tensor, gamma: torch.Tensor,
                   beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns grad_y (z's layout), grad_u [N, O, H, K] and grad_bn [2, O] (gamma, beta), accumulation dtype."""
    backend = resolve_for(z.device, "head_backward")
    return backend.head_backward(layout_for_kernels(grad_out), z, bw, gamma, beta, mean, var, training, eps)


@_head_backward.register_fake
def _(grad_out, z, bw, gamma, beta, mean, var, training, eps):
    n, o, h, _ = z.shape
    acc = acc_dtype(z.dtype)
    return torch.empty_like(z), z.new_empty(n, o, h, bw.shape[1], dtype=acc), z.new_empty(2, o, dtype=acc)


def _setup_context(ctx, inputs, output):
    _, _, bw, gamma, beta, _, _, training, eps, _ = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.save_for_backward(z, bw, gamma, beta, mean, var)
    ctx.training, ctx.eps = training, eps


def _backward(ctx, grad_out, _gz, _gmean, _gvar):
    z, bw, gamma, beta, mean, var = ctx.saved_tensors
    if z.numel() == 0:
        raise RuntimeError("psp::head_bn_relu: backward through a call made with keep_z=False (z was not kept)")
    grad_y, grad_u, grad_bn = _head_backward(grad_out, z, bw, gamma, beta, mean, var, ctx.training, ctx.eps)
    return (grad_y, grad_u, None, grad_bn[0].to(gamma.dtype), grad_bn[1].to(beta.dtype), None, None, None,
            None, None)


_head.register_autograd(_backward, setup_context=_setup_context)


def head_bn_relu(y: torch.Tensor, u: torch.Tensor, bw: torch.Tensor, bn_weight: torch.Tensor,
                 bn_bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
                 num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(batch_norm(y + u @ bw^T))``: add the branch term, BatchNorm, ReLU in one fused op.

    Args:
        y: [N, O, H, W] fp16/bf16/fp32/fp64, NCHW or channels_last (the x-half conv's output).
        u: [N, O, H, K] in the accumulation dtype (fp32; fp64 for fp64 y): the branch term before its
            W-axis interpolation (``psp_kernels.head.branch_factors``).
        bw: [W, K], u's dtype: the W-axis interpolation weights (no gradient flows to it).
        bn_weight, bn_bias, running_mean, running_var: the BatchNorm tensors [O], y's dtype or fp32.
        training: batch statistics (biased variance normalises) and an in-place update of the running
            statistics (unbiased variance) and ``num_batches_tracked`` exactly as ``nn.BatchNorm2d``;
            otherwise the running statistics normalise and nothing is modified.
        momentum: running-average factor; ``None`` uses the cumulative average 1/num_batches_tracked.
        eps: added to the variance.
        num_batches_tracked: the int64 counter to increment in training (optional).

    Returns:
        [N, O, H, W] in y's dtype and memory format. Differentiable w.r.t. y, u, bn_weight, bn_bias;
        deterministic (no atomics). Saved for backward: z = y + u @ bw^T (one tensor of y's size).

    Raises:
        TypeError / ValueError / RuntimeError: a wrong rank, shape, dtype or device (the message names the
            argument); ValueError "Expected more than 1 value per channel when training" as BatchNorm.

    Source: performance.md §2 (concat-free head); hszhao/semseg ``model/pspnet.py`` (``cls.0``-``cls.2``).
    """
    check_tensor(y, "y", 4)
    n, o, h, w = y.shape
    acc = acc_dtype(y.dtype)
    check_tensor(u, "u", 4, y.device)
    if tuple(u.shape[:3]) != (n, o, h) or u.dtype != acc:
        raise ValueError(f"u must be [{n}, {o}, {h}, K] of dtype {acc} for y of shape {tuple(y.shape)}, "
                         f"got {tuple(u.shape)} {u.dtype}")
    check_tensor(bw, "bw", 2, y.device)
    if tuple(bw.shape) != (w, u.shape[3]) or bw.dtype != acc:
        raise ValueError(f"bw must be [{w}, {u.shape[3]}] of dtype {acc}, got {tuple(bw.shape)} {bw.dtype}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_tensor(t, name, 1, y.device)
        if t.shape[0] != o:
            raise ValueError(f"{name} must have shape ({o},), got {tuple(t.shape)}")
    if training and n * h * w == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
    keep_z = torch.is_grad_enabled() and any(t.requires_grad for t in (y, u, bn_weight, bn_bias))
    out, _, mean, var = _head(y, u.contiguous(), bw.contiguous(), bn_weight, bn_bias, running_mean, running_var,
                              training, eps, keep_z)
    if training:
        update_running_stats(mean[None], var[None], [running_mean], [running_var],
                             None if num_batches_tracked is None else [num_batches_tracked], momentum, [n * h * w])
    return out
