"""Concat-free PSP head: pyramid pooling + semseg's 3x3 conv + BN + ReLU without the 2C-channel concat.

semseg's head computes ``relu(bn(conv3x3(cat([x, up(p_1), up(p_2), up(p_3), up(p_6)]))))``. The conv splits
by input channel, and upsampling is linear and spatial while the conv mixes channels per tap, so the
branch half is computed exactly at bin resolution (performance.md §2):

    conv(up(p_b); W_b) = sum over taps (ky, kx) of  B_{b,ky} (W_b[:, :, ky, kx] p_b) B_{b,kx}^T

with ``B_{b,k}`` the bilinear interpolation matrix shifted to tap k and **zero** outside the image (the
conv's zero padding; ``geometry.shifted_interpolation``). The big conv runs on x's C channels only (half
the FLOPs of the concat conv, forward and backward) and neither the concat nor the upsampled branches
are materialised; the branch term is added before BatchNorm, so BN's batch statistics are those of the
full conv output. Parameters are semseg's tensors: ``ppm.features.*``, ``cls.0.weight`` [O, C + nb*R,
3, 3] (its first C input channels act on x, then each bin's R), ``cls.1.*``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import DEFAULT_BINS, acc_dtype, shifted_interpolation, split_bins
from .modules import PyramidPooling
from .ops.head import head_bn_relu

_MATRIX_CACHE: dict = {}


def _taps(size: int, b: int, kernel: int, padding: int, dilation: int, dtype, device) -> torch.Tensor:
    key = (size, b, kernel, padding, dilation, dtype, str(device))
    if key not in _MATRIX_CACHE:
        _MATRIX_CACHE[key] = shifted_interpolation(size, b, kernel, padding, dilation, dtype, device)
    return _MATRIX_CACHE[key]


class _TapMix(torch.autograd.Function):
    """q[n, o, t, s] = sum_r w[o, r, t] p[n, r, s], the per-tap channel mix on the bin grid.

    Autograd of the einsum would save the permuted copy of w it multiplies with (9 * O * R values per
    bin); this saves w itself (a view of the conv weight) and p, and permutes again in backward.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, p)
        return torch.einsum("ort,nrs->nots", w, p)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor):
        w, p = ctx.saved_tensors
        grad_w = torch.einsum("nots,nrs->ort", grad_q, p) if ctx.needs_input_grad[0] else None
        grad_p = torch.einsum("nots,ort->nrs", grad_q, w) if ctx.needs_input_grad[1] else None
        return grad_w, grad_p


def branch_factors(branches: torch.Tensor, weight: torch.Tensor, bins: Sequence[int], size: tuple[int, int],
                   padding: int = 1, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch term of the head conv, ``conv2d(cat([up(p_b) for b in bins]), weight)``, factored as
    ``u @ bw^T`` per (n, o, h) row: everything but the last (W-axis) interpolation, and that interpolation.

    Args:
        branches: packed branches [N, R, S] (``PyramidPooling.branches``), any float dtype.
        weight: [O, nb*R, kh, kw], the branch slice of the head conv's weight (bins in order).
        bins: the bin sizes; size: (H, W) of the map the branches are upsampled to (align_corners=True).
        padding, dilation: the conv's (zero) padding and dilation, the same on both axes; stride 1.

    Returns:
        ``u`` [N, O, H, K] and ``bw`` [W, K], K = kw * sum(bins), in the accumulation dtype (fp32; fp64
        for fp64): per bin the per-tap channel mix on the b x b grid, interpolated along H with the
        shifted (zero-padded) matrices, then along W by ``bw``. ``u`` is differentiable w.r.t. branches
        and weight; ``bw`` is a cached constant. Cost: the channel mix (K = R) and a product with K = kh*b.
    """
    n, r, _ = branches.shape
    o, _, kh, kw = weight.shape
    height, width = size
    dt, dev = acc_dtype(branches.dtype), branches.device
    us, bws = [], []
    # One unbind (and one split in the caller): their backwards write the weight gradient in one pass,
    # where per-bin slices would each zero-fill a full-size gradient.
    per_bin = weight.to(dt).unflatten(1, (len(bins), r)).unbind(1)
    for b, p, w in zip(bins, split_bins(branches.to(dt), bins), per_bin):
        q = _TapMix.apply(w.flatten(2), p.flatten(2)).reshape(n, o, kh, kw, b, b)      # [N, O, kh, kw, b, b]
        bh = _taps(height, b, kh, padding, dilation, dt, dev)                          # [kh, H, b]
        us.append(torch.einsum("iha,noijab->nohjb", bh, q).flatten(3))                 # [N, O, H, kw*b]
        bws.append(_taps(width, b, kw, padding, dilation, dt, dev).permute(1, 0, 2).reshape(width, kw * b))
    return torch.cat(us, dim=3), _bw(bws, (width, tuple(bins), kw, padding, dilation, dt, str(dev)))


def _bw(parts: list[torch.Tensor], key: tuple) -> torch.Tensor:
    key = ("bw",) + key
    if key not in _MATRIX_CACHE:
        _MATRIX_CACHE[key] = torch.cat(parts, dim=1)
    return _MATRIX_CACHE[key]


def branch_conv(branches: torch.Tensor, weight: torch.Tensor, bins: Sequence[int], size: tuple[int, int],
                padding: int = 1, dilation: int = 1) -> torch.Tensor:
    """``conv2d(cat([up(p_b) for b in bins]), weight)`` (no bias) computed at bin resolution.

    Arguments as :func:`branch_factors`. Returns [N, O, H, W] in the accumulation dtype, NCHW,
    differentiable w.r.t. branches and weight: ``u @ bw^T``, which the fused head forms inside its
    epilogue kernel instead (:func:`psp_kernels.ops.head.head_bn_relu`).
    """
    u, bw = branch_factors(branches, weight, bins, size, padding, dilation)
    return torch.matmul(u, bw.t())


def concat_free_head(x: torch.Tensor, ppm: PyramidPooling, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(bn(conv(ppm(x))))`` of semseg's head, without the concat (see the module docstring).

    The x-half conv is ``F.conv2d`` (oneDNN / cuDNN); the branch term's W-axis interpolation, its add,
    BatchNorm and ReLU are one fused op (``psp::head_bn_relu``), which saves only its BatchNorm input.

    Args:
        x: [N, C, H, W] (NCHW or channels_last), the backbone features.
        ppm: the pyramid pooling module (its ``features.*`` parameters and BN).
        conv: semseg's ``cls.0``: Conv2d(C + nb*R, O, 3x3, stride 1, padding = dilation, no bias, groups 1).
        bn: semseg's ``cls.1``: BatchNorm2d(O) with affine parameters and running statistics; train mode
            uses and updates batch statistics exactly as ``nn.BatchNorm2d``.

    Returns:
        [N, O, H, W] in x's dtype and memory format.

    Raises:
        ValueError: a conv this identity does not cover (stride, groups, bias, padding mode, or a channel
            count other than C + nb*R).
        NotImplementedError: a BatchNorm without affine parameters or running statistics (use the concat
            head, ``PSPHead(fused=False)``).
    """
    c = x.shape[1]
    k = conv.kernel_size
    if (conv.stride != (1, 1) or conv.groups != 1 or conv.bias is not None or conv.padding_mode != "zeros"
            or k[0] != k[1] or conv.padding[0] != conv.padding[1] or conv.dilation[0] != conv.dilation[1]
            or conv.in_channels != c + len(ppm.bins) * ppm.features[0][1].out_channels):
        raise ValueError("concat_free_head needs the PSP head conv: stride 1, groups 1, no bias, zero padding, "
                         f"square kernel/padding/dilation and {c} + len(bins) * R input channels; got {conv}")
    if not (bn.affine and bn.track_running_stats):
        raise NotImplementedError("concat_free_head needs a BatchNorm with affine=True and "
                                  "track_running_stats=True; use the concat head (fused=False)")
    w_x, w_b = conv.weight.split([c, conv.in_channels - c], dim=1)
    y = F.conv2d(x, w_x, padding=conv.padding, dilation=conv.dilation)
    u, bw = branch_factors(ppm.branches(x), w_b, ppm.bins, tuple(x.shape[2:]), conv.padding[0], conv.dilation[0])
    return head_bn_relu(y, u, bw, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=bn.training,
                        momentum=bn.momentum, eps=bn.eps, num_batches_tracked=bn.num_batches_tracked)


class PSPHead(nn.Module):
    """PSPNet's pyramid pooling module + 3x3 conv + BN + ReLU (semseg's ``ppm`` and ``cls.0``-``cls.2``),
    concat-free.

    Args:
        in_channels: C (2048 for PSPNet-50); reduction_channels: R per bin (semseg: C // len(bins)).
        out_channels: O of the 3x3 conv (semseg: 512); bins: pyramid sizes.
        fused: the concat-free forward (default); ``False`` runs semseg's concat head.

    Forward: x [N, C, H, W] fp16/bf16/fp32/fp64 (NCHW or channels_last) -> [N, O, H, W], x's dtype and
    memory format. state_dict: ``ppm.features.{i}.*`` and ``cls.0.weight`` [O, C + nb*R, 3, 3], ``cls.1.*``:
    semseg's keys, so a semseg checkpoint's head loads unchanged (e.g. with ``strict=False``, or after
    dropping its ``cls.4`` keys).

    Raises:
        ValueError: bad channel counts or ``bins`` (from :class:`PyramidPooling`); in training, a bin with
            one value per channel (BatchNorm's error).

    Source: Zhao et al., CVPR 2017, Sec. 3.2; hszhao/semseg ``model/pspnet.py``; performance.md §2.
    """

    def __init__(self, in_channels: int, reduction_channels: int, out_channels: int = 512,
                 bins: Sequence[int] = DEFAULT_BINS, fused: bool = True):
        super().__init__()
        self.ppm = PyramidPooling(in_channels, reduction_channels, bins)
        self.cls = nn.Sequential(
            nn.Conv2d(in_channels + len(self.ppm.bins) * reduction_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.cls(self.ppm(x))
        return concat_free_head(x, self.ppm, self.cls[0], self.cls[1])

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
