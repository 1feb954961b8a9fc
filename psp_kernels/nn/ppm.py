"""``PyramidPooling``: semseg's pyramid pooling module (PPM) with its state_dict layout, running the fused op."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batchnorm import syncs_statistics
from ..geometry import DEFAULT_BINS, check_bins, split_bins
from ..ops import multibin_avg_pool, pyramid_pooling, reduction_conv_bn_relu, upsample_concat


class PyramidPooling(nn.Module):
    """Drop-in pyramid pooling module (semseg's ``PPM``) running the three fused ops.

    Args:
        in_channels: C, channels of x (2048 for PSPNet-50).
        reduction_channels: R, channels of each branch's 1x1 reduction conv (semseg: ``in_channels // len(bins)``).
        bins: pyramid output sizes, default (1, 2, 3, 6).
        fused: run the fused op :func:`psp_kernels.ops.pyramid_pooling` (default: pool + copy of x into the
            concat, reduction, upsampling: three passes); ``False`` runs semseg's module-by-module forward.

    Forward: x [N, C, H, W] fp16/bf16/fp32/fp64 (NCHW or channels_last) -> [N, C + len(bins)*R, H, W] in
    x's dtype and memory format, channels ordered x, bin 1, 2, 3, 6. The submodules are semseg's
    (``features.{i}`` = pool, conv, BN, ReLU), so ``features.{i}.1.weight`` / ``features.{i}.2.*`` load
    from a semseg checkpoint unchanged; BatchNorm behaves as ``nn.BatchNorm2d`` in train and eval mode.
    After ``nn.SyncBatchNorm.convert_sync_batchnorm`` the training forward pools with the fused op and runs
    each branch's conv, SyncBatchNorm and ReLU as modules on the pooled grid (statistics over all
    processes), then upsamples with the fused op.

    Raises:
        ValueError: bad ``bins`` or channel counts; in training, a bin with one value per channel.
        NotImplementedError: fused forward with a BatchNorm the fused op does not cover
            (``affine=False``, ``track_running_stats=False``, or eps/momentum differing across bins).

    Source: Zhao et al., CVPR 2017, Sec. 3.2; hszhao/semseg ``model/pspnet.py``.
    """

    def __init__(self, in_channels: int, reduction_channels: int, bins: Sequence[int] = DEFAULT_BINS,
                 fused: bool = True):
        bins = check_bins(bins)
        for name, value in (("in_channels", in_channels), ("reduction_channels", reduction_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__()
        self.features = nn.ModuleList([        # semseg's layout: features.{i} = (pool, conv, BN, ReLU)
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduction_channels, 1, bias=False),
                          nn.BatchNorm2d(reduction_channels), nn.ReLU(inplace=True))
            for b in bins])
        self.bins = bins
        self.fused = fused

    def _batch_norms(self) -> list[nn.BatchNorm2d]:
        bns = [f[2] for f in self.features]
        first = bns[0]
        for bn in bns:
            if not (bn.affine and bn.track_running_stats):
                raise NotImplementedError("fused PyramidPooling needs BatchNorm with affine=True and "
                                          "track_running_stats=True; use fused=False")
            if (bn.eps, bn.momentum) != (first.eps, first.momentum):
                raise NotImplementedError("fused PyramidPooling needs the same BatchNorm eps and momentum in "
                                          "every bin; use fused=False")
        return bns

    def _branch_params(self) -> tuple[list, dict]:
        """The fused ops' per-bin parameter lists and BatchNorm keywords (shared by forward and branches)."""
        bns = self._batch_norms()
        lists = [[f[1].weight for f in self.features], [bn.weight for bn in bns], [bn.bias for bn in bns],
                 [bn.running_mean for bn in bns], [bn.running_var for bn in bns]]
        return lists, dict(bins=self.bins, training=self.training, momentum=bns[0].momentum, eps=bns[0].eps,
                           num_batches_tracked=[bn.num_batches_tracked for bn in bns])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:                     # semseg's PPM.forward
            size = x.shape[2:]
            return torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                                    for f in self.features], 1)
        if any(syncs_statistics(f[2]) for f in self.features):
            return upsample_concat(x, self.branches(x), self.bins)
        lists, kwargs = self._branch_params()
        return pyramid_pooling(x, *lists, **kwargs)

    def branches(self, x: torch.Tensor) -> torch.Tensor:
        """Every bin's branch (pool -> 1x1 conv -> BN -> ReLU) at bin resolution, before upsampling.

        x [N, C, H, W] -> packed branches [N, R, S] in x's dtype (bin k at ``[:, :, off_k:off_k + b*b]``,
        see ``geometry.split_bins``); BatchNorm as in :meth:`forward` (training updates the running
        statistics). Used by the concat-free head (:class:`psp_kernels.PSPHead`).
        """
        if not self.fused:
            return torch.cat([f(x).flatten(2) for f in self.features], dim=2)
        if any(syncs_statistics(f[2]) for f in self.features):
            grids = split_bins(multibin_avg_pool(x, self.bins), self.bins)   # f = (pool, conv, BN, ReLU)
            branches = [f[3](f[2](f[1](p))).flatten(2) for f, p in zip(self.features, grids)]
            return torch.cat(branches, dim=2).to(x.dtype)
        lists, kwargs = self._branch_params()
        return reduction_conv_bn_relu(multibin_avg_pool(x, self.bins), *lists, **kwargs)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, fused={self.fused}"
