"""Pure-PyTorch oracle: semseg's pyramid pooling math, and the backend interface every kernel implements.

Every backend (this module, ``psp_kernels.triton``, the compiled ``psp_kernels._C``) provides the same
six functions with the same arguments and results, and the three fused-pass variants at the end of this
module (``pool_concat_forward``, ``upsample_into``, ``pool_backward_add``, used by the whole-PPM op); all
but the CUDA C++ backend also provide the concat-free head's epilogue (``head_forward``, ``head_backward``).
``psp_kernels.ops`` calls them through ``psp_kernels.backends``. Layout conventions (see ``psp_kernels.geometry``):

- ``pooled`` [N, C, S] and ``branches`` [N, R, S]: bins packed along the last dim, contiguous,
  dtype of x. ``z``, ``mean``, ``var`` are in the accumulation dtype (fp64 for fp64, else fp32).
- ``weights[k]`` [R, C, 1, 1] is bin k's 1x1 conv; ``gammas``/``betas``/``running_*`` [R] its BN.
  Parameters may be x's dtype or fp32; math runs in the accumulation dtype.

Source: hszhao/semseg ``model/pspnet.py`` (``PPM``); Zhao et al., CVPR 2017, Sec. 3.2.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import acc_dtype, bin_offsets, interpolation_matrix, is_channels_last, pooling_matrix


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def pool_forward(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of x [N, C, H, W] to every bin; returns packed pooled [N, C, S]."""
    xa = x.to(acc_dtype(x.dtype))
    return torch.cat([F.adaptive_avg_pool2d(xa, b).flatten(2) for b in bins], dim=2).to(x.dtype)


def pool_backward(grad_pooled: torch.Tensor, bins: Sequence[int], height: int, width: int,
                  channels_last: bool) -> torch.Tensor:
    """Gradient of :func:`pool_forward`: grad_x [N, C, H, W] = sum_b P_h^T g_b P_w (P: pooling matrix)."""
    n, c, _ = grad_pooled.shape
    dt = acc_dtype(grad_pooled.dtype)
    g = grad_pooled.to(dt)
    grad_x = g.new_zeros(n, c, height, width)
    for b, off in zip(bins, bin_offsets(bins)):
        ph = pooling_matrix(b, height, dt, g.device)
        pw = pooling_matrix(b, width, dt, g.device)
        gb = g[:, :, off:off + b * b].reshape(n, c, b, b)
        grad_x += torch.einsum("ih,ncij,jw->nchw", ph, gb, pw)
    return grad_x.to(grad_pooled.dtype).contiguous(memory_format=_memory_format(channels_last))


def _bin_slices(bins: Sequence[int]):
    return [(k, off, b * b) for k, (b, off) in enumerate(zip(bins, bin_offsets(bins)))]


def project_forward(pooled: torch.Tensor, weights: Sequence[torch.Tensor], gammas: Sequence[torch.Tensor],
                    betas: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                    running_vars: Sequence[torch.Tensor], bins: Sequence[int], training: bool, eps: float):
    """Per bin: 1x1 conv (no bias) + BatchNorm + ReLU on the packed pooled tensor.

    Returns ``(out [N, R, S] pooled.dtype, z [N, R, S] acc, mean [nb, R] acc, var [nb, R] acc)``: z is the
    conv output, mean/var the statistics used to normalise (batch statistics, biased var, in training;
    the running statistics in eval). Running statistics are not modified here.
    """
    dt = acc_dtype(pooled.dtype)
    p = pooled.to(dt)
    z = torch.cat([torch.einsum("rc,ncs->nrs", weights[k].to(dt).flatten(1), p[:, :, off:off + s])
                   for k, off, s in _bin_slices(bins)], dim=2)
    if training:
        zs = [z[:, :, off:off + s] for _, off, s in _bin_slices(bins)]
        mean = torch.stack([t.mean(dim=(0, 2)) for t in zs])
        var = torch.stack([t.var(dim=(0, 2), unbiased=False) for t in zs])
    else:
        mean = torch.stack([m.to(dt) for m in running_means])
        var = torch.stack([v.to(dt) for v in running_vars])
    y = _normalize(z, mean, var, gammas, betas, bins, eps)
    return torch.relu(y).to(pooled.dtype), z, mean, var


def _per_cell(stat: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Expand a per-bin statistic [nb, R] to the packed cells: [R, S]."""
    return torch.cat([stat[k, :, None].expand(-1, s) for k, _, s in _bin_slices(bins)], dim=1)


def _normalize(z, mean, var, gammas, betas, bins, eps):
    dt = z.dtype
    gamma = torch.stack([g.to(dt) for g in gammas])
    beta = torch.stack([b.to(dt) for b in betas])
    scale = gamma * torch.rsqrt(var + eps)
    return z * _per_cell(scale, bins) + _per_cell(beta - mean * scale, bins)


def project_backward(grad_out: torch.Tensor, pooled: torch.Tensor, z: torch.Tensor,
                     weights: Sequence[torch.Tensor], gammas: Sequence[torch.Tensor],
                     betas: Sequence[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                     bins: Sequence[int], training: bool, eps: float):
    """Gradient of :func:`project_forward` w.r.t. pooled, the conv weights and BN gamma/beta.

    Returns ``(grad_pooled [N, C, S] pooled.dtype, [grad_w_k [R, C, 1, 1]], [grad_gamma_k [R]],
    [grad_beta_k [R]])``, parameter gradients in the accumulation dtype. In training mode the
    gradient flows through the batch statistics (as ``nn.BatchNorm2d``); in eval mode it does not.
    """
    dt = z.dtype
    p = pooled.to(dt)
    y = _normalize(z, mean, var, gammas, betas, bins, eps)
    g = grad_out.to(dt) * (y > 0)
    invstd = torch.rsqrt(var + eps)
    grad_p, grad_w, grad_gamma, grad_beta = [], [], [], []
    for k, off, s in _bin_slices(bins):
        gk, zk = g[:, :, off:off + s], z[:, :, off:off + s]
        xhat = (zk - mean[k, None, :, None]) * invstd[k, None, :, None]
        dbeta = gk.sum(dim=(0, 2))
        dgamma = (gk * xhat).sum(dim=(0, 2))
        gam = gammas[k].to(dt)[None, :, None]
        if training:
            m = gk.shape[0] * s
            dz = gam * invstd[k, None, :, None] * (gk - dbeta[None, :, None] / m - xhat * dgamma[None, :, None] / m)
        else:
            dz = gk * gam * invstd[k, None, :, None]
        w = weights[k].to(dt).flatten(1)
        grad_p.append(torch.einsum("rc,nrs->ncs", w, dz))
        grad_w.append(torch.einsum("nrs,ncs->rc", dz, p[:, :, off:off + s]).reshape(weights[k].shape))
        grad_gamma.append(dgamma)
        grad_beta.append(dbeta)
    return torch.cat(grad_p, dim=2).to(pooled.dtype), grad_w, grad_gamma, grad_beta


def upsample_forward(x: torch.Tensor, branches: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
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
    return torch.cat(outs, dim=1).contiguous(memory_format=_memory_format(is_channels_last(x)))


def upsample_backward(grad_out: torch.Tensor, bins: Sequence[int], channels: int) -> torch.Tensor:
    """Gradient of :func:`upsample_forward` w.r.t. the packed branches: [N, R, S], grad_out's dtype.

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
        grads.append(torch.einsum("hi,nrhw,wj->nrij", ah, gk, aw).reshape(n, r, b * b))
    return torch.cat(grads, dim=2).to(grad_out.dtype)


# --------------------------------------------------------------------------------------------------
# Fused-pass variants used by the whole-PPM op (``psp::pyramid_pooling``): the concat buffer is
# allocated by the pooling pass, which copies x into it while it reads x for the bins (3P forward
# instead of 4P); the upsampling pass then writes only the branch channels; the pooling backward adds
# the pass-through gradient in the same pass (3P backward instead of 5P).
# --------------------------------------------------------------------------------------------------

def pool_concat_forward(x: torch.Tensor, bins: Sequence[int], total_channels: int):
    """:func:`pool_forward` that also allocates the concat buffer and copies x into its first C channels.

    Returns ``(pooled [N, C, S], concat [N, total_channels, H, W])``: concat has x's dtype and memory
    format, ``concat[:, :C] == x``, and channels ``[C, total_channels)`` are uninitialised.
    """
    n, c, h, w = x.shape
    concat = torch.empty(n, total_channels, h, w, dtype=x.dtype, device=x.device,
                         memory_format=_memory_format(is_channels_last(x)))
    concat[:, :c].copy_(x)
    return pool_forward(x, bins), concat


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


def pool_backward_add(grad_pooled: torch.Tensor, bins: Sequence[int], residual: torch.Tensor,
                      channels_last: bool) -> torch.Tensor:
    """``residual + pool_backward(grad_pooled, ...)``: grad of x when x also passes through to the output.

    ``residual`` [N, C, H, W] is the pass-through gradient, typically the channel slice
    ``grad_concat[:, :C]`` (a view: any strides with ``stride(h) == W * stride(w)``). The sum is formed
    in the accumulation dtype and rounded once; the result is NCHW or channels_last as asked.
    """
    _, _, h, w = residual.shape
    dt = acc_dtype(grad_pooled.dtype)
    grad = pool_backward(grad_pooled.to(dt), bins, h, w, channels_last) + residual.to(dt)
    return grad.to(grad_pooled.dtype).contiguous(memory_format=_memory_format(channels_last))


# --------------------------------------------------------------------------------------------------
# The concat-free head's epilogue (``psp::head_bn_relu``, psp_kernels/head.py): the branch term's last
# interpolation (along W), its add to the x-half conv output, BatchNorm and ReLU. The branch term is
# ``u @ bw^T`` per (n, o, h) row: ``u`` [N, O, H, K] is the tap-mixed branches already interpolated along H
# and ``bw`` [W, K] every (tap column, bin column)'s shifted interpolation weight, K = kw * sum(bins).
# --------------------------------------------------------------------------------------------------

def _bn_scale_shift(gamma, beta, mean, var, eps):
    """BatchNorm as ``z * scale + shift`` (the same affine map as csrc/bn_affine.h)."""
    invstd = torch.rsqrt(var + eps)
    scale = gamma.to(var.dtype) * invstd
    return invstd, scale, beta.to(var.dtype) - mean * scale


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def head_forward(y: torch.Tensor, u: torch.Tensor, bw: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, eps: float,
                 keep_z: bool):
    """``relu(bn(y + u @ bw^T))`` with the statistics it used; returns ``(out, z, mean, var)``.

    ``y`` [N, O, H, W] (NCHW or channels_last); ``u`` [N, O, H, K] and ``bw`` [W, K] contiguous, in the
    accumulation dtype; ``gamma``/``beta``/``running_*`` [O], y's dtype or fp32. ``z = y + u @ bw^T``
    rounded to y's dtype: the tensor BatchNorm sees (its statistics in training, as ``nn.BatchNorm2d`` on
    the rounded sum). ``out`` and ``z`` have y's dtype and memory format; ``z`` is empty ([0]) unless
    ``keep_z`` or ``training``. ``mean``/``var`` [O], accumulation dtype: the batch statistics (biased
    variance) in training, the running ones otherwise.
    """
    acc = acc_dtype(y.dtype)
    fmt = _memory_format(is_channels_last(y))
    z = (y.to(acc) + torch.matmul(u, bw.t())).to(y.dtype).contiguous(memory_format=fmt)
    zf = z.to(acc)
    if training:
        var, mean = torch.var_mean(zf, dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
    _, scale, shift = _bn_scale_shift(gamma, beta, mean, var, eps)
    out = torch.relu(zf * _per_channel(scale) + _per_channel(shift)).to(y.dtype).contiguous(memory_format=fmt)
    return out, (z if keep_z or training else z.new_empty(0)), mean, var


def head_backward(grad_out: torch.Tensor, z: torch.Tensor, bw: torch.Tensor, gamma: torch.Tensor,
                  beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float):
    """Gradient of :func:`head_forward`; returns ``(grad_y, grad_u, grad_bn)``.

    ``grad_out`` [N, O, H, W] any layout; ``z`` the forward's. ``grad_y`` has z's dtype and memory format
    (it is also the gradient of z); ``grad_u = grad_z @ bw`` [N, O, H, K] and ``grad_bn`` [2, O] (the
    gradients of gamma, then beta: one tensor, as a custom op may not return views of one buffer) are in
    the accumulation dtype, formed from the unrounded ``grad_z``. The ReLU mask is
    ``z * scale + shift > 0``, the forward's pre-activation. In training ``grad_z`` is BatchNorm's
    batch-statistics gradient, otherwise ``grad_z = scale * grad``.
    """
    acc = acc_dtype(z.dtype)
    zf = z.to(acc)
    _, scale, shift = _bn_scale_shift(gamma, beta, mean, var, eps)
    mask = zf * _per_channel(scale) + _per_channel(shift) > 0
    grad_z, grad_bn = _bn_backward(torch.where(mask, grad_out.to(acc), 0), zf, gamma, beta, mean, var, training, eps)
    grad_y = grad_z.to(z.dtype).contiguous(memory_format=_memory_format(is_channels_last(z)))
    return grad_y, torch.matmul(grad_z, bw), grad_bn


def _bn_backward(g: torch.Tensor, zf: torch.Tensor, gamma, beta, mean, var, training: bool, eps: float):
    """BatchNorm's backward for the (already ReLU-masked) output gradient ``g`` of input ``zf``, both in the
    accumulation dtype: ``(grad_z, grad_bn [2, O] = (grad_gamma, grad_beta))``; batch statistics in training."""
    invstd, scale, _ = _bn_scale_shift(gamma, beta, mean, var, eps)
    xhat = (zf - _per_channel(mean)) * _per_channel(invstd)
    grad_beta, grad_gamma = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
    if training:
        count = zf.numel() // zf.shape[1]
        g = g - _per_channel(grad_beta / count) - xhat * _per_channel(grad_gamma / count)
    return g * _per_channel(scale), torch.stack((grad_gamma, grad_beta))


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
# Backbone convolution with BatchNorm folded in (inference): ``act(conv2d(x, w, b) + residual)``.
# ``w`` and ``b`` are the conv weight and BatchNorm scale / shift folded together
# (``psp_kernels.conv.fold_bn``); the residual is the bottleneck's shortcut. The backward is ATen's
# convolution backward for every backend.
# --------------------------------------------------------------------------------------------------

def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                  stride: int, padding: int, dilation: int, relu: bool) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride, padding, dilation) + residual?)``.

    ``x`` [N, C, H, W] (NCHW or channels_last), ``weight`` [O, C, kh, kw], ``bias`` [O] or None, ``residual``
    [N, O, Ho, Wo] or None. Computed in the accumulation dtype (fp32; fp64 for fp64) and rounded once to x's
    dtype, in x's memory format. On CPU this is the production path: oneDNN's convolution, then the residual
    add and ReLU in place.
    """
    acc = acc_dtype(x.dtype)
    y = F.conv2d(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc), stride, padding, dilation)
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y.to(x.dtype).contiguous(memory_format=_memory_format(is_channels_last(x)))


def conv_bias_act_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                           stride: int, padding: int, dilation: int, relu: bool, mask: Sequence[bool]):
    """Gradient of :func:`conv_bias_act`; returns ``(grad_x, grad_weight, grad_bias, grad_residual)``, each
    None where ``mask`` (x, weight, bias, residual) says it is not needed. The ReLU mask is ``out > 0``;
    ``grad_residual`` is the gradient of the conv's output (in grad_out's dtype), the conv gradients come
    from ATen's ``convolution_backward``."""
    grad_z = torch.where(out > 0, grad_out, 0) if relu else grad_out
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_z.to(x.dtype), x, weight.to(x.dtype), [weight.shape[0]] if mask[2] else None, [stride] * 2,
        [padding] * 2, [dilation] * 2, False, [0, 0], 1, [bool(mask[0]), bool(mask[1]), bool(mask[2])])
    return gx, gw, gb, ((grad_z if relu else grad_z.clone()) if mask[3] else None)


# --------------------------------------------------------------------------------------------------
# Backbone convolution + BatchNorm (batch statistics) + residual + ReLU for training. The conv's output y
# is stored once; its per-channel statistics come from the conv's epilogue (Triton), then BatchNorm, the
# residual add and ReLU are one pass. Backward: BatchNorm + ReLU in one op, the conv's in ATen.
# --------------------------------------------------------------------------------------------------

def conv_bn_train_forward(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                          residual: torch.Tensor | None, stride: int, padding: int, dilation: int, relu: bool,
                          eps: float):
    """``relu?(bn_train(conv2d(x, weight)) + residual?)``; returns ``(out, y, mean, var)``.

    ``y`` is the conv output rounded to x's dtype (the tensor BatchNorm sees), in x's memory format; ``mean``
    and ``var`` [O] its batch statistics (biased variance) in the accumulation dtype; ``out`` has x's dtype
    and memory format. ``gamma``/``beta`` [O], x's dtype or fp32; ``residual`` [N, O, Ho, Wo] or None.
    """
    acc = acc_dtype(x.dtype)
    fmt = _memory_format(is_channels_last(x))
    y = F.conv2d(x.to(acc), weight.to(acc), None, stride, padding, dilation).to(x.dtype).contiguous(memory_format=fmt)
    yf = y.to(acc)
    var, mean = torch.var_mean(yf, dim=(0, 2, 3), unbiased=False)
    _, scale, shift = _bn_scale_shift(gamma, beta, mean, var, eps)
    z = yf * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        z = z + residual.to(acc)
    out = (torch.relu(z) if relu else z).to(x.dtype).contiguous(memory_format=fmt)
    return out, y, mean, var


def bn_act_backward(grad_out: torch.Tensor, y: torch.Tensor, out: torch.Tensor, gamma: torch.Tensor,
                    beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, relu: bool, eps: float,
                    has_residual: bool):
    """Gradient of the BatchNorm (batch statistics) + residual + ReLU part of :func:`conv_bn_train_forward`;
    returns ``(grad_y, grad_residual, grad_bn)``: ``grad_y`` in y's dtype and memory format, ``grad_residual``
    (the ReLU-masked output gradient; empty without a residual) in grad_out's dtype and y's memory format,
    ``grad_bn`` [2, O] (gamma, beta) in the accumulation dtype. The ReLU mask is ``out > 0``."""
    acc = acc_dtype(y.dtype)
    fmt = _memory_format(is_channels_last(y))
    g = torch.where(out > 0, grad_out.to(acc), 0) if relu else grad_out.to(acc)
    grad_y, grad_bn = _bn_backward(g, y.to(acc), gamma, beta, mean, var, True, eps)
    grad_res = g.to(grad_out.dtype).contiguous(memory_format=fmt) if has_residual else y.new_empty(0)
    return grad_y.to(y.dtype).contiguous(memory_format=fmt), grad_res, grad_bn
