"""The pure-PyTorch oracle: the math of every ``psp::`` kernel op, from semseg's definitions, in PyTorch ops.

One function per kernel op, named as the op and with its schema (the ``reference`` candidate of
:data:`psp_kernels.dispatch.KERNEL_TABLE`, and the ops' default on other devices). Every kernel (C++,
CUDA C++, Triton) is tested against these functions in fp64, and these against semseg's modules.
Layout conventions (see ``psp_kernels.geometry``):

- ``pooled`` [N, C, S] and ``branches`` [N, R, S]: bins packed along the last dim, contiguous, dtype of x.
  ``bn_input``, ``mean``, ``var`` are in the accumulation dtype (fp64 for fp64, else fp32).
- ``conv_weights[k]`` [R, C, 1, 1] is bin k's 1x1 reduction conv; ``bn_weights``/``bn_biases``/``running_*``
  [R] its BatchNorm. Parameters may be x's dtype or fp32; math runs in the accumulation dtype.

:class:`SemsegPPM` is semseg's PPM module itself, built from stock modules: the oracle of the fused module.

Source: hszhao/semseg ``model/pspnet.py`` (``PPM``), ``model/resnet.py``; Zhao et al., CVPR 2017, Sec. 3.2.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import acc_dtype, bin_offsets, interpolation_matrix, is_channels_last, memory_format, pooling_matrix


def multibin_avg_pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of x [N, C, H, W] to every bin; returns packed pooled [N, C, S]."""
    xa = x.to(acc_dtype(x.dtype))
    return torch.cat([F.adaptive_avg_pool2d(xa, b).flatten(2) for b in bins], dim=2).to(x.dtype)


def multibin_avg_pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                  channels_last: bool) -> torch.Tensor:
    """Gradient of :func:`multibin_avg_pool`: grad_x [N, C, H, W] = sum_b P_h^T g_b P_w (P: pooling matrix)."""
    n, c, _ = grad_pooled.shape
    dt = acc_dtype(grad_pooled.dtype)
    g = grad_pooled.to(dt)
    grad_x = g.new_zeros(n, c, height, width)
    for b, off in zip(bins, bin_offsets(bins)):
        ph = pooling_matrix(b, height, dt, g.device)
        pw = pooling_matrix(b, width, dt, g.device)
        gb = g[:, :, off:off + b * b].reshape(n, c, b, b)
        grad_x += ph.t() @ gb @ pw                                # P_h^T g_b P_w
    return grad_x.to(grad_pooled.dtype).contiguous(memory_format=memory_format(channels_last))


def _bin_slices(bins: Sequence[int]):
    return [(k, off, b * b) for k, (b, off) in enumerate(zip(bins, bin_offsets(bins)))]


def reduction_conv_bn_relu(pooled: torch.Tensor, conv_weights: Sequence[torch.Tensor],
                           bn_weights: Sequence[torch.Tensor], bn_biases: Sequence[torch.Tensor],
                           running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                           bins: Sequence[int], training: bool, eps: float):
    """Per bin: 1x1 reduction conv (no bias) + BatchNorm + ReLU on the packed pooled tensor.

    Returns ``(out [N, R, S] pooled.dtype, bn_input [N, R, S] acc, mean [nb, R] acc, var [nb, R] acc)``:
    bn_input is the conv output, mean/var the statistics used to normalise (batch statistics, biased var,
    in training; the running statistics in eval). Running statistics are not modified here.
    """
    dt = acc_dtype(pooled.dtype)
    p = pooled.to(dt)
    z = torch.cat([torch.einsum("rc,ncs->nrs", conv_weights[k].to(dt).flatten(1), p[:, :, off:off + s])
                   for k, off, s in _bin_slices(bins)], dim=2)
    if training:
        zs = [z[:, :, off:off + s] for _, off, s in _bin_slices(bins)]
        mean = torch.stack([t.mean(dim=(0, 2)) for t in zs])
        var = torch.stack([t.var(dim=(0, 2), unbiased=False) for t in zs])
    else:
        mean = torch.stack([m.to(dt) for m in running_means])
        var = torch.stack([v.to(dt) for v in running_vars])
    y = _normalize(z, mean, var, bn_weights, bn_biases, bins, eps)
    return torch.relu(y).to(pooled.dtype), z, mean, var


def _per_cell(stat: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Expand a per-bin statistic [nb, R] to the packed cells: [R, S]."""
    return torch.cat([stat[k, :, None].expand(-1, s) for k, _, s in _bin_slices(bins)], dim=1)


def _normalize(z, mean, var, bn_weights, bn_biases, bins, eps):
    dt = z.dtype
    bn_weight = torch.stack([g.to(dt) for g in bn_weights])
    bn_bias = torch.stack([b.to(dt) for b in bn_biases])
    scale = bn_weight * torch.rsqrt(var + eps)
    return z * _per_cell(scale, bins) + _per_cell(bn_bias - mean * scale, bins)


def reduction_conv_bn_relu_backward(grad_out: torch.Tensor, pooled: torch.Tensor, bn_input: torch.Tensor,
                                    conv_weights: Sequence[torch.Tensor], bn_weights: Sequence[torch.Tensor],
                                    bn_biases: Sequence[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                                    bins: Sequence[int], training: bool, eps: float):
    """Gradient of :func:`reduction_conv_bn_relu` w.r.t. pooled, the conv weights, bn_weights and bn_biases.

    Returns ``(grad_pooled [N, C, S] pooled.dtype, grad_conv_weights [nb, R, C], grad_bn_weights [nb, R],
    grad_bn_biases [nb, R])``, the parameter gradients in the accumulation dtype. In training mode the
    gradient flows through the batch statistics (as ``nn.BatchNorm2d``); in eval mode it does not.
    """
    z = bn_input
    dt = z.dtype
    p = pooled.to(dt)
    y = _normalize(z, mean, var, bn_weights, bn_biases, bins, eps)
    g = grad_out.to(dt) * (y > 0)
    invstd = torch.rsqrt(var + eps)
    grad_p, grad_w, grad_bn_weight, grad_bn_bias = [], [], [], []
    for k, off, s in _bin_slices(bins):
        gk, zk = g[:, :, off:off + s], z[:, :, off:off + s]
        xhat = (zk - mean[k, None, :, None]) * invstd[k, None, :, None]
        dbn_bias = gk.sum(dim=(0, 2))
        dbn_weight = (gk * xhat).sum(dim=(0, 2))
        bn_w = bn_weights[k].to(dt)[None, :, None]
        if training:
            m = gk.shape[0] * s
            dz = bn_w * invstd[k, None, :, None] * (gk - dbn_bias[None, :, None] / m
                                                   - xhat * dbn_weight[None, :, None] / m)
        else:
            dz = gk * bn_w * invstd[k, None, :, None]
        w = conv_weights[k].to(dt).flatten(1)
        grad_p.append(torch.einsum("rc,nrs->ncs", w, dz))
        grad_w.append(torch.einsum("nrs,ncs->rc", dz, p[:, :, off:off + s]))
        grad_bn_weight.append(dbn_weight)
        grad_bn_bias.append(dbn_bias)
    return (torch.cat(grad_p, dim=2).to(pooled.dtype), torch.stack(grad_w), torch.stack(grad_bn_weight),
            torch.stack(grad_bn_bias))


def upsample_concat(x: torch.Tensor, branches: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Concat [N, C + nb*R, H, W] of x and every branch upsampled bilinearly (align_corners=True).

    Channel order is x, then bins in order (semseg). The result has x's memory format and dtype.
    """
    n, r, _ = branches.shape
    size = x.shape[2:]
    dt = acc_dtype(x.dtype)
    outs = [x]
    for _, off, s in _bin_slices(bins):
        b = int(round(s ** 0.5))
        pb = branches[:, :, off:off + s].reshape(n, r, b, b).to(dt)
        outs.append(F.interpolate(pb, size=size, mode="bilinear", align_corners=True).to(x.dtype))
    return torch.cat(outs, dim=1).contiguous(memory_format=memory_format(is_channels_last(x)))


def upsample_concat_backward(grad_out: torch.Tensor, bins: Sequence[int], channels: int) -> torch.Tensor:
    """Gradient of :func:`upsample_concat` w.r.t. the packed branches: [N, R, S], grad_out's dtype.

    ``channels`` is C, the number of pass-through channels of x at the front of grad_out.
    Per bin: ``A_h^T g A_w`` with A the interpolation matrix (a gather, deterministic).
    """
    n, total, h, w = grad_out.shape
    r = (total - channels) // len(bins)
    dt = acc_dtype(grad_out.dtype)
    grads = []
    for k, b in enumerate(bins):
        gk = grad_out[:, channels + k * r: channels + (k + 1) * r].to(dt)
        ah = interpolation_matrix(h, b, dt, grad_out.device)
        aw = interpolation_matrix(w, b, dt, grad_out.device)
        grads.append((ah.t() @ gk @ aw).reshape(n, r, b * b))   # A_h^T g A_w
    return torch.cat(grads, dim=2).to(grad_out.dtype)


# --------------------------------------------------------------------------------------------------
# Fused-pass variants used by the whole-PPM op (``psp::pyramid_pooling``): the concat buffer is
# allocated by the pooling pass, which copies x into it while it reads x for the bins (3P forward
# instead of 4P); the upsampling pass then writes only the branch channels; the pooling backward adds
# the pass-through gradient in the same pass (3P backward instead of 5P).
# --------------------------------------------------------------------------------------------------

def multibin_avg_pool_with_concat(x: torch.Tensor, bins: Sequence[int], total_channels: int):
    """:func:`multibin_avg_pool` that also allocates the concat buffer and copies x into its first C channels.

    Returns ``(pooled [N, C, S], concat [N, total_channels, H, W])``: concat has x's dtype and memory
    format, ``concat[:, :C] == x``, and channels ``[C, total_channels)`` are uninitialised.
    """
    return multibin_avg_pool(x, bins), concat_buffer(x, total_channels)


def concat_buffer(x: torch.Tensor, total_channels: int) -> torch.Tensor:
    """[N, total_channels, H, W] in x's dtype and memory format, x copied into its first C channels, the rest
    uninitialised."""
    n, c, h, w = x.shape
    concat = torch.empty(n, total_channels, h, w, dtype=x.dtype, device=x.device,
                         memory_format=memory_format(is_channels_last(x)))
    concat[:, :c].copy_(x)
    return concat


def upsample_into(concat: torch.Tensor, branches: torch.Tensor, bins: Sequence[int], channels: int) -> None:
    """Write every branch, upsampled bilinearly (align_corners=True), into ``concat[:, channels:]`` in place.

    ``concat`` [N, channels + nb*R, H, W] (NCHW or channels_last), ``branches`` [N, R, S] contiguous.
    """
    n, r, _ = branches.shape
    size = concat.shape[2:]
    dt = acc_dtype(concat.dtype)
    for k, off, s in _bin_slices(bins):
        b = int(round(s ** 0.5))
        pb = branches[:, :, off:off + s].reshape(n, r, b, b).to(dt)
        concat[:, channels + k * r: channels + (k + 1) * r] = F.interpolate(
            pb, size=size, mode="bilinear", align_corners=True)


def multibin_avg_pool_backward_add(grad_pooled: torch.Tensor, bins: Sequence[int], residual: torch.Tensor,
                      channels_last: bool) -> torch.Tensor:
    """``residual + multibin_avg_pool_backward(grad_pooled, ...)``: grad of x when x also passes through to the output.

    ``residual`` [N, C, H, W] is the pass-through gradient, typically the channel slice
    ``grad_concat[:, :C]`` (a view: any strides with ``stride(h) == W * stride(w)``). The sum is formed
    in the accumulation dtype and rounded once; the result is NCHW or channels_last as asked.
    """
    _, _, h, w = residual.shape
    dt = acc_dtype(grad_pooled.dtype)
    grad = multibin_avg_pool_backward(grad_pooled.to(dt), bins, h, w, channels_last) + residual.to(dt)
    return grad.to(grad_pooled.dtype).contiguous(memory_format=memory_format(channels_last))


# --------------------------------------------------------------------------------------------------
# The concat-free head's epilogue (``psp::add_branch_bn_relu``, psp_kernels/nn/head.py): the branch term's
# last interpolation (along W), its add to the x-half conv output, BatchNorm and ReLU. The branch term is
# ``branch_rows @ width_interp^T`` per (n, o, h) row: ``branch_rows`` [N, O, H, K] is the tap-mixed branches
# already interpolated along H and ``width_interp`` [W, K] every (tap column, bin column)'s shifted
# interpolation weight, K = kw * sum(bins).
# --------------------------------------------------------------------------------------------------

def _bn_scale_shift(bn_weight, bn_bias, mean, var, eps):
    """BatchNorm as ``z * scale + shift`` (the same affine map as csrc/bn_affine.h)."""
    invstd = torch.rsqrt(var + eps)
    scale = bn_weight.to(var.dtype) * invstd
    return invstd, scale, bn_bias.to(var.dtype) - mean * scale


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def add_branch_bn_relu(conv_out: torch.Tensor, branch_rows: torch.Tensor, width_interp: torch.Tensor,
                       bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor, training: bool, eps: float, keep_bn_input: bool):
    """``relu(bn(conv_out + branch_rows @ width_interp^T))`` with the statistics it used; returns
    ``(out, bn_input, mean, var)``.

    ``conv_out`` [N, O, H, W] (NCHW or channels_last); ``branch_rows`` [N, O, H, K] and ``width_interp``
    [W, K] contiguous, in the accumulation dtype; ``bn_weight``/``bn_bias``/``running_*`` [O], conv_out's dtype
    or fp32. ``bn_input = conv_out + branch_rows @ width_interp^T`` rounded to conv_out's dtype: the tensor
    BatchNorm sees (its statistics in training, as ``nn.BatchNorm2d`` on the rounded sum). ``out`` and
    ``bn_input`` have conv_out's dtype and memory format; ``bn_input`` is empty ([0]) unless ``keep_bn_input``
    or ``training``. ``mean``/``var`` [O], accumulation dtype: the batch statistics (biased variance) in
    training, the running ones otherwise.
    """
    y, u, bw = conv_out, branch_rows, width_interp
    acc = acc_dtype(y.dtype)
    fmt = memory_format(is_channels_last(y))
    z = (y.to(acc) + torch.matmul(u, bw.t())).to(y.dtype).contiguous(memory_format=fmt)
    zf = z.to(acc)
    if training:
        var, mean = torch.var_mean(zf, dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
    _, scale, shift = _bn_scale_shift(bn_weight, bn_bias, mean, var, eps)
    out = torch.relu(zf * _per_channel(scale) + _per_channel(shift)).to(y.dtype).contiguous(memory_format=fmt)
    return out, (z if keep_bn_input or training else z.new_empty(0)), mean, var


def add_branch_bn_relu_backward(grad_out: torch.Tensor, bn_input: torch.Tensor, width_interp: torch.Tensor,
                                bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                                training: bool, eps: float):
    """Gradient of :func:`add_branch_bn_relu`; returns ``(grad_conv_out, grad_branch_rows, grad_bn)``.

    ``grad_out`` [N, O, H, W] any layout; ``bn_input`` the forward's. ``grad_conv_out`` has bn_input's dtype
    and memory format (it is also the gradient of bn_input); ``grad_branch_rows = grad_z @ width_interp``
    [N, O, H, K] and ``grad_bn`` [2, O] (the gradients of bn_weight, then bn_bias: one tensor, as a custom op
    may not return views of one buffer) are in the accumulation dtype, formed from the unrounded gradient
    ``grad_z`` of bn_input. The ReLU mask is ``bn_input * scale + shift > 0``, the forward's pre-activation.
    In training ``grad_z`` is BatchNorm's batch-statistics gradient, otherwise ``grad_z = scale * grad``.
    """
    z, bw = bn_input, width_interp
    acc = acc_dtype(z.dtype)
    zf = z.to(acc)
    _, scale, shift = _bn_scale_shift(bn_weight, bn_bias, mean, var, eps)
    mask = zf * _per_channel(scale) + _per_channel(shift) > 0
    grad_z, grad_bn = _bn_backward(torch.where(mask, grad_out.to(acc), 0), zf, bn_weight, bn_bias, mean, var,
                                   training, eps)
    grad_y = grad_z.to(z.dtype).contiguous(memory_format=memory_format(is_channels_last(z)))
    return grad_y, torch.matmul(grad_z, bw), grad_bn


def _bn_backward(g: torch.Tensor, zf: torch.Tensor, bn_weight, bn_bias, mean, var, training: bool, eps: float):
    """BatchNorm's backward for the (already ReLU-masked) output gradient ``g`` of input ``zf``, both in the
    accumulation dtype: ``(grad_z, grad_bn [2, O] = (grad_bn_weight, grad_bn_bias))``; batch statistics in training."""
    invstd, scale, _ = _bn_scale_shift(bn_weight, bn_bias, mean, var, eps)
    xhat = (zf - _per_channel(mean)) * _per_channel(invstd)
    grad_bn_bias, grad_bn_weight = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
    if training:
        count = zf.numel() // zf.shape[1]
        g = g - _per_channel(grad_bn_bias / count) - xhat * _per_channel(grad_bn_weight / count)
    return g * _per_channel(scale), torch.stack((grad_bn_weight, grad_bn_bias))


class SemsegPPM(nn.Module):
    """semseg's ``PPM`` exactly, built from stock modules: the unfused oracle for the fused path.

    Args:
        in_dim: C, channels of x (2048 for ResNet-50).
        reduction_dim: R, channels of each branch (semseg: ``in_dim // len(bins)``).
        bins: output sizes of the pyramid levels.

    Forward: x [N, C, H, W] float -> [N, C + len(bins)*R, H, W]; state_dict keys ``features.{i}.1.weight``
    (conv [R, C, 1, 1]) and ``features.{i}.2.*`` (BatchNorm2d). Source: hszhao/semseg ``model/pspnet.py``.
    """

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int]):
        super().__init__()
        self.features = nn.ModuleList([
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            ) for b in bins
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), size, mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


# --------------------------------------------------------------------------------------------------
# Backbone convolutions. Inference, BatchNorm folded into the conv (``psp_kernels.nn.conv.fold_bn``):
# ``relu?(conv2d(x, weight, bias) + residual?)``, the residual being the bottleneck's shortcut. Training:
# ``relu?(batch_norm_train(conv2d(x, weight)) + residual?)`` with the batch statistics returned for the
# running-statistics update; its backward is the BatchNorm + residual + ReLU part here, then the conv's
# (psp_kernels/eager.py: ``folded_conv_backward``).
# --------------------------------------------------------------------------------------------------

def folded_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride, padding, dilation) + residual?)``.

    ``x`` [N, C, H, W] (NCHW or channels_last), ``weight`` [O, C, kh, kw], ``bias`` [O] or None, ``residual``
    [N, O, Ho, Wo] or None. Computed in the accumulation dtype (fp32; fp64 for fp64) and rounded once to x's
    dtype, in x's memory format.
    """
    acc = acc_dtype(x.dtype)
    y = F.conv2d(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc), stride, padding, dilation)
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y.to(x.dtype).contiguous(memory_format=memory_format(is_channels_last(x)))


def training_conv(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                  residual: torch.Tensor | None, stride: int, padding: int, dilation: int, relu: bool, eps: float):
    """``relu?(bn_train(conv2d(x, weight)) + residual?)``; returns ``(out, bn_input, mean, var)``.

    ``bn_input`` is the conv output rounded to x's dtype (the tensor BatchNorm sees), in x's memory format;
    ``mean`` and ``var`` [O] its batch statistics (biased variance) in the accumulation dtype; ``out`` has x's
    dtype and memory format. ``bn_weight``/``bn_bias`` [O], x's dtype or fp32; ``residual`` [N, O, Ho, Wo] or
    None. The conv runs in the accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    y = F.conv2d(x.to(acc), weight.to(acc), None, stride, padding, dilation).to(x.dtype)
    return batch_norm_residual_relu(y.contiguous(memory_format=memory_format(is_channels_last(x))), bn_weight,
                                    bn_bias, residual, relu, eps)


def batch_norm_residual_relu(bn_input: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                             residual: torch.Tensor | None, relu: bool, eps: float):
    """``relu?(batch_norm_train(bn_input) + residual?)`` of a conv output; returns ``(out, bn_input, mean, var)``
    as :func:`training_conv` (statistics and math in the accumulation dtype, ``out`` rounded once)."""
    acc = acc_dtype(bn_input.dtype)
    yf = bn_input.to(acc)
    var, mean = torch.var_mean(yf, dim=(0, 2, 3), unbiased=False)
    _, scale, shift = _bn_scale_shift(bn_weight, bn_bias, mean, var, eps)
    z = yf * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        z = z + residual.to(acc)
    out = (torch.relu(z) if relu else z).to(bn_input.dtype)
    return out.contiguous(memory_format=memory_format(is_channels_last(bn_input))), bn_input, mean, var


def training_conv_bn_backward(grad_out: torch.Tensor, bn_input: torch.Tensor, out: torch.Tensor,
                              bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                              relu: bool, eps: float, has_residual: bool):
    """Gradient of the BatchNorm (batch statistics) + residual + ReLU part of :func:`training_conv`; returns
    ``(grad_bn_input, grad_residual, grad_bn)``: ``grad_bn_input`` in bn_input's dtype and memory format,
    ``grad_residual`` (the ReLU-masked output gradient; empty without a residual) in grad_out's dtype and
    bn_input's memory format, ``grad_bn`` [2, O] (bn_weight, bn_bias) in the accumulation dtype. The ReLU mask
    is ``out > 0``."""
    y = bn_input
    acc = acc_dtype(y.dtype)
    fmt = memory_format(is_channels_last(y))
    g = torch.where(out > 0, grad_out.to(acc), 0) if relu else grad_out.to(acc)
    grad_y, grad_bn = _bn_backward(g, y.to(acc), bn_weight, bn_bias, mean, var, True, eps)
    grad_res = g.to(grad_out.dtype).contiguous(memory_format=fmt) if has_residual else y.new_empty(0)
    return grad_y.to(y.dtype).contiguous(memory_format=fmt), grad_res, grad_bn
