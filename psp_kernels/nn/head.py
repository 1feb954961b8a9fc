"""Concat-free PSP head: pyramid pooling + semseg's 3x3 conv + BN + ReLU without the 2C-channel concat.

semseg's head computes ``relu(bn(conv3x3(cat([x, up(p_1), up(p_2), up(p_3), up(p_6)]))))``. The conv splits
by input channel, and upsampling is linear and spatial while the conv mixes channels per tap, so the
branch half is computed exactly at bin resolution (docs/concat_free_head.md):

    conv(up(p_b); W_b) = sum over taps (ky, kx) of  B_{b,ky} (W_b[:, :, ky, kx] p_b) B_{b,kx}^T

with ``B_{b,k}`` the bilinear interpolation matrix shifted to tap k and **zero** outside the image (the
conv's zero padding; ``geometry.shifted_interpolation``). The big conv runs on x's C channels only (half
the FLOPs of the concat conv, forward and backward) and neither the concat nor the upsampled branches
are materialised; the branch term is added before BatchNorm, so BN's batch statistics are those of the
full conv output. Parameters are semseg's tensors: ``ppm.features.*``, ``cls.0.weight`` [O, C + nb*R,
3, 3] (its first C input channels act on x, then each bin's R), ``cls.1.*``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batchnorm import syncs_statistics
from ..geometry import DEFAULT_BINS, acc_dtype, shifted_interpolation, split_bins
from ..ops.head import add_branch_bn_relu
from ..table_cache import cached_table
from .ppm import PyramidPooling


def _taps(size: int, b: int, kernel: int, padding: int, dilation: int, dtype, device) -> torch.Tensor:
    """Cached ``shifted_interpolation`` [kernel, size, b]."""
    return cached_table(("taps", size, b, kernel, padding, dilation, dtype, str(device)),
                        lambda: shifted_interpolation(size, b, kernel, padding, dilation, dtype, device))


def _width_interp(width: int, bins: Sequence[int], kw: int, padding: int, dilation: int, dtype, device) -> torch.Tensor:
    """Cached [W, kw * sum(bins)]: every (tap column, bin column)'s W-axis interpolation weight, bins in order."""
    return cached_table(("bw", width, tuple(bins), kw, padding, dilation, dtype, str(device)), lambda: torch.cat(
        [_taps(width, b, kw, padding, dilation, dtype, device).permute(1, 0, 2).reshape(width, kw * b) for b in bins],
        dim=1))


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = a @ b`` for a strided ``out`` view: BLAS writes it in place in eager mode; under
    torch.compile (which rejects a non-contiguous ``out=``) an assignment that Inductor plans itself."""
    if torch.compiler.is_compiling():
        out.copy_(torch.mm(a, b))
    else:
        torch.mm(a, b, out=out)


class _TapMix(torch.autograd.Function):
    """Every bin's per-tap channel mix: ``q_k[n, s, (t, o)] = sum_r p_k[n, r, s] w[(t, o), k, r]``.

    ``w`` [kh*kw*O, nb, R] (a view of a tap-major weight: each bin's [kh*kw*O, R] operand is a GEMM view);
    ``p_k`` [N, R, b, b]; ``q_k`` [N, b*b, kh*kw*O]. The backward writes each bin's weight gradient straight
    into its slice of one [kh*kw*O, nb, R] buffer, where autograd of per-bin views would stack copies.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, *ps: torch.Tensor):
        ctx.save_for_backward(w, *ps)
        return tuple(torch.matmul(p.flatten(2).transpose(1, 2), w[:, k].t()) for k, p in enumerate(ps))

    @staticmethod
    def backward(ctx, *grad_qs: torch.Tensor):
        w, *ps = ctx.saved_tensors
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        grad_ps = []
        for k, (p, g) in enumerate(zip(ps, grad_qs)):
            if grad_w is not None:
                _mm_into(g.reshape(-1, g.shape[-1]).t(), p.flatten(2).transpose(1, 2).reshape(-1, p.shape[1]),
                         grad_w[:, k])
            grad_ps.append(torch.matmul(g, w[:, k]).transpose(1, 2).reshape(p.shape)
                           if ctx.needs_input_grad[k + 1] else None)
        return (grad_w, *grad_ps)


def branch_factors(branches: torch.Tensor, weight_taps: torch.Tensor, bins: Sequence[int], size: tuple[int, int],
                   padding: int = 1, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch term of the head conv, ``conv2d(cat([up(p_b) for b in bins]), weight)``, factored as
    ``branch_rows @ width_interp^T`` per (n, o, h) row: everything but the last (W-axis) interpolation, and
    that interpolation.

    Args:
        branches: packed branches [N, R, S] (``PyramidPooling.branches``), any float dtype.
        weight_taps: [kh, kw, O, nb*R], the branch slice of the head conv's weight, tap-major (bins in
            order): ``weight[:, C:].permute(2, 3, 0, 1)``; :class:`HeadConv` stores it so (no copy).
        bins: the bin sizes; size: (H, W) of the map the branches are upsampled to (align_corners=True).
        padding, dilation: the conv's (zero) padding and dilation, the same on both axes; stride 1.

    Returns:
        ``branch_rows`` [N, O, H, K] and ``width_interp`` [W, K], K = kw * sum(bins), in the accumulation
        dtype (fp32; fp64 for fp64; also under autocast, which is off for these small GEMMs): per bin the
        per-tap channel mix on the b x b grid (one GEMM, K = R), interpolated along H with the shifted
        (zero-padded) matrices, then along W by ``width_interp``. ``branch_rows`` is differentiable w.r.t.
        branches and the weight; ``width_interp`` is a cached constant.
    """
    n, r, _ = branches.shape
    kh, kw, o, _ = weight_taps.shape
    height, width = size
    dt, dev = acc_dtype(branches.dtype), branches.device
    us = []
    with torch.autocast(dev.type, enabled=False):  # bin-resolution GEMMs: kept in dt under mixed precision
        qs = _TapMix.apply(weight_taps.to(dt).reshape(kh * kw * o, len(bins), r), *split_bins(branches.to(dt), bins))
        for b, q in zip(bins, qs):           # u[n, o, h, (j, c)] = sum_(i, a) bh[i, h, a] q[n, (a, c), (i, j, o)]
            q = q.reshape(n, b, b, kh, kw * o).permute(0, 3, 1, 2, 4).reshape(n, kh * b, b * kw * o)
            bh = _taps(height, b, kh, padding, dilation, dt, dev).permute(1, 0, 2).reshape(height, kh * b)
            u = torch.matmul(bh, q).reshape(n, height, b, kw, o)                       # [N, H, b, kw, O]
            us.append(u.permute(0, 4, 1, 3, 2).reshape(n, o, height, kw * b))          # [N, O, H, kw*b]
    return torch.cat(us, dim=3), _width_interp(width, bins, kw, padding, dilation, dt, dev)


def branch_conv(branches: torch.Tensor, weight: torch.Tensor, bins: Sequence[int], size: tuple[int, int],
                padding: int = 1, dilation: int = 1) -> torch.Tensor:
    """``conv2d(cat([up(p_b) for b in bins]), weight)`` (no bias) computed at bin resolution.

    Arguments as :func:`branch_factors`. Returns [N, O, H, W] in the accumulation dtype, NCHW,
    differentiable w.r.t. branches and weight: ``branch_rows @ width_interp^T``, which the fused head forms
    inside its epilogue kernel instead (:func:`psp_kernels.ops.head.add_branch_bn_relu`).
    """
    branch_rows, width_interp = branch_factors(branches, weight.permute(2, 3, 0, 1), bins, size, padding, dilation)
    return torch.matmul(branch_rows, width_interp.t())


def concat_free_head(x: torch.Tensor, ppm: PyramidPooling, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(bn(conv(ppm(x))))`` of semseg's head, without the concat (see the module docstring).

    The x-half conv is ``F.conv2d`` (oneDNN / cuDNN); the branch term's W-axis interpolation, its add,
    BatchNorm and ReLU are one fused op (``psp::add_branch_bn_relu``), which saves only its BatchNorm input.

    Args:
        x: [N, C, H, W] (NCHW or channels_last), the backbone features.
        ppm: the pyramid pooling module (its ``features.*`` parameters and BN).
        conv: semseg's ``cls.0``: a :class:`HeadConv` (no weight copies), or an ``nn.Conv2d(C + nb*R, O, 3x3,
            stride 1, padding = dilation, no bias, groups 1)`` whose weight slices are copied per call.
        bn: semseg's ``cls.1``: BatchNorm2d(O) with affine parameters and running statistics; train mode
            uses and updates batch statistics exactly as ``nn.BatchNorm2d``. A SyncBatchNorm in training
            runs as the module on ``conv_out + branch_rows @ width_interp^T`` (statistics over all processes),
            then ReLU.

    Returns:
        [N, O, H, W] in x's dtype and memory format.

    Raises:
        ValueError: a conv this identity does not cover (stride, groups, bias, padding mode, or a channel
            count other than C + nb*R).
        NotImplementedError: a BatchNorm without affine parameters or running statistics (use the concat
            head, ``PSPHead(concat_free=False)``).
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
                                  "track_running_stats=True; use the concat head (concat_free=False)")
    if isinstance(conv, HeadConv):
        w_x, w_taps = conv.weight_x, conv.weight_taps()
    else:
        w_x, w_b = conv.weight.split([c, conv.in_channels - c], dim=1)
        w_taps = w_b.permute(2, 3, 0, 1)
    conv_out = F.conv2d(x, w_x, padding=conv.padding, dilation=conv.dilation)
    branch_rows, width_interp = branch_factors(ppm.branches(x), w_taps, ppm.bins, tuple(x.shape[2:]),
                                               conv.padding[0], conv.dilation[0])
    if syncs_statistics(bn):
        return F.relu(bn(conv_out + torch.matmul(branch_rows, width_interp.t()).to(conv_out.dtype)))
    return add_branch_bn_relu(conv_out, branch_rows, width_interp, bn.weight, bn.bias, bn.running_mean,
                              bn.running_var, training=bn.training, momentum=bn.momentum, eps=bn.eps,
                              num_batches_tracked=bn.num_batches_tracked)


class HeadConv(nn.Module):
    """semseg's ``cls.0`` conv, Conv2d(C + nb*R, O, k, padding, dilation, bias=False), with its weight held
    as the two parts the concat-free head multiplies separately.

    ``weight_x`` [O, C, k, k] (contiguous: the x-half conv reads it without a copy and its gradient is
    the parameter's) and ``weight_branches`` [O, nb*R, k, k], stored tap-major ([k, k, O, nb*R] in memory,
    so each bin's per-tap channel mix is a GEMM on a view). ``weight`` is their concat, and state_dict
    saves and loads it under semseg's key ``weight``: checkpoints are interchangeable with
    ``nn.Conv2d``'s. Initialisation is ``nn.Conv2d``'s (kaiming-uniform over the full fan-in).

    Args:
        x_channels: C; branch_channels: nb*R; out_channels: O; kernel_size, padding, dilation: ints.

    Forward (the concat head, ``PSPHead(fused=False)``): [N, C + nb*R, H, W] -> [N, O, H, W] with the
    concatenated weight. Raises ValueError for non-positive channel counts.
    """

    stride, groups, bias, padding_mode = (1, 1), 1, None, "zeros"

    def __init__(self, x_channels: int, branch_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 1, dilation: int = 1):
        super().__init__()
        if min(x_channels, branch_channels, out_channels, kernel_size) < 1:
            raise ValueError(f"HeadConv needs positive channel counts and kernel size, got x_channels={x_channels}, "
                             f"branch_channels={branch_channels}, out_channels={out_channels}, "
                             f"kernel_size={kernel_size}")
        self.x_channels, self.in_channels, self.out_channels = x_channels, x_channels + branch_channels, out_channels
        self.kernel_size, self.padding, self.dilation = (kernel_size,) * 2, (padding,) * 2, (dilation,) * 2
        k = kernel_size
        self.weight_x = nn.Parameter(torch.empty(out_channels, x_channels, k, k))
        self.weight_branches = nn.Parameter(torch.empty(k, k, out_channels, branch_channels).permute(2, 3, 0, 1))
        self.reset_parameters()
        self.register_state_dict_post_hook(HeadConv._save_merged)
        self.register_load_state_dict_pre_hook(HeadConv._load_split)

    def reset_parameters(self) -> None:
        full = torch.empty(self.out_channels, self.in_channels, *self.kernel_size)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))            # nn.Conv2d.reset_parameters
        with torch.no_grad():
            self.weight_x.copy_(full[:, :self.x_channels])
            self.weight_branches.copy_(full[:, self.x_channels:])

    @property
    def weight(self) -> torch.Tensor:
        """[O, C + nb*R, k, k]: semseg's weight (a new tensor, differentiable w.r.t. both parts)."""
        return torch.cat([self.weight_x, self.weight_branches], dim=1)

    def weight_taps(self) -> torch.Tensor:
        """``weight_branches`` as [k, k, O, nb*R], a contiguous view."""
        return self.weight_branches.permute(2, 3, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, 1, self.padding, self.dilation)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.half``, ...), then ``weight_branches`` back in tap-major
        memory if the conversion changed its strides (``.to(memory_format=torch.channels_last)`` does): the tap
        mix reads it as GEMM views, where any other layout costs a copy of the whole weight per call."""
        super()._apply(fn, recurse)
        weight = self.weight_branches
        if not weight.permute(2, 3, 0, 1).is_contiguous():
            with torch.no_grad():
                weight.data = weight.data.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
        return self

    @staticmethod
    def _save_merged(module, state_dict, prefix, local_metadata) -> None:
        state_dict.pop(prefix + "weight_x")
        state_dict.pop(prefix + "weight_branches")
        state_dict[prefix + "weight"] = module.weight.detach()

    @staticmethod
    def _load_split(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
        weight = state_dict.pop(prefix + "weight", None)
        if weight is None:
            return                        # missing: load_state_dict reports weight_x / weight_branches
        if weight.dim() != 4 or weight.shape[1] != module.in_channels:
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape "
                              f"{tuple(weight.shape)}, the shape in current model is "
                              f"({module.out_channels}, {module.in_channels}, {module.kernel_size[0]}, "
                              f"{module.kernel_size[1]})")
            return
        state_dict[prefix + "weight_x"], state_dict[prefix + "weight_branches"] = weight.split(
            [module.x_channels, module.in_channels - module.x_channels], dim=1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
                f"dilation={self.dilation}, bias=False, x_channels={self.x_channels}")


class PSPHead(nn.Module):
    """PSPNet's head: the pyramid pooling module + 3x3 conv + BN + ReLU (semseg's ``ppm`` and ``cls.0``-``cls.2``),
    concat-free, optionally ending in semseg's classifier (``cls.3`` Dropout2d, ``cls.4`` 1x1 conv).

    Args:
        in_channels: C (2048 for PSPNet-50); reduction_channels: R per bin (semseg: C // len(bins)).
        out_channels: O of the 3x3 conv (semseg: 512); bins: pyramid sizes.
        fused: the default of both switches below (True: all fused; False: semseg's modules).
        fused_ppm: the PPM runs the fused kernels (:class:`PyramidPooling` ``fused``); default ``fused``.
        concat_free: the concat-free forward (the 3x3 conv on x's channels, the branch half at bin resolution,
            one fused add + BN + ReLU op); ``False`` runs semseg's concat head; default ``fused``.
        classes: when given, the head ends in semseg's classifier, Dropout2d(``dropout``) + 1x1 conv (with
            bias) to ``classes`` channels, and returns logits.
        dropout: the classifier's Dropout2d probability, in [0, 1).

    Forward: x [N, C, H, W] fp16/bf16/fp32/fp64 (NCHW or channels_last) -> [N, O, H, W] (or [N, classes, H, W]
    logits), x's dtype and memory format. state_dict: ``ppm.features.{i}.*``, ``cls.0.weight``
    [O, C + nb*R, 3, 3], ``cls.1.*`` (and ``cls.4.*``): semseg's keys, so a semseg checkpoint's head loads
    unchanged.

    Raises:
        ValueError: bad channel counts, ``bins``, ``classes`` or ``dropout``; in training, a bin with one value
            per channel (BatchNorm's error).

    Source: Zhao et al., CVPR 2017, Sec. 3.2; hszhao/semseg ``model/pspnet.py``; docs/concat_free_head.md.
    """

    def __init__(self, in_channels: int, reduction_channels: int, out_channels: int = 512,
                 bins: Sequence[int] = DEFAULT_BINS, fused: bool = True, *, fused_ppm: Optional[bool] = None,
                 concat_free: Optional[bool] = None, classes: Optional[int] = None, dropout: float = 0.1):
        super().__init__()
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
            raise ValueError(f"classes must be a positive int or None, got {classes!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.fused_ppm = fused if fused_ppm is None else bool(fused_ppm)
        self.concat_free = fused if concat_free is None else bool(concat_free)
        self.ppm = PyramidPooling(in_channels, reduction_channels, bins, fused=self.fused_ppm)
        branch_channels = len(self.ppm.bins) * reduction_channels
        layers = [HeadConv(in_channels, branch_channels, out_channels) if self.concat_free
                  else nn.Conv2d(in_channels + branch_channels, out_channels, 3, padding=1, bias=False),
                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if classes is not None:
            layers += [nn.Dropout2d(p=dropout), nn.Conv2d(out_channels, classes, kernel_size=1)]
        self.cls = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return psp_head(x, self.ppm, self.cls, self.concat_free)

    def extra_repr(self) -> str:
        return f"fused_ppm={self.fused_ppm}, concat_free={self.concat_free}"


def psp_head(x: torch.Tensor, ppm: PyramidPooling, cls: nn.Sequential, concat_free: bool) -> torch.Tensor:
    """The forward of a :class:`PSPHead`'s modules (also run by ``pspnet.PSPNet`` on the ``ppm`` and ``cls``
    it takes from its PSPHead, so that its state_dict keeps semseg's flat ``ppm.*`` / ``cls.*`` keys).

    ``cls`` is semseg's Sequential (conv, BN, ReLU[, Dropout2d, 1x1 conv]); concat-free, its first three run
    as :func:`concat_free_head`, otherwise every module of ``cls`` runs on ``ppm(x)``.
    """
    if not concat_free:
        return cls(ppm(x))
    y = concat_free_head(x, ppm, cls[0], cls[1])    # cls.0-cls.2 in one pass over y
    for layer in cls[3:]:
        y = layer(y)
    return y
