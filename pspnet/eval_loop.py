"""Evaluation of a model on a dataset: semseg's test procedure (``tool/test.py``) on every image, the metric
areas accumulated and, across processes, summed."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .config import TrainConfig
from .data import IMAGENET_MEAN, IMAGENET_STD
from .distributed import DistContext
from .inference import predict
from .loaders import base_dataset
from .metrics import SegmentationMetrics
from .precision import autocast

__all__ = ["ImageCallback", "evaluate_dataset"]

ImageCallback = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]
"""``on_image(name, image uint8 RGB [H, W, 3], label uint8 [H, W], pred int64 [H, W])``."""


def evaluate_dataset(model: nn.Module, dataset: Dataset, cfg: TrainConfig, scales: Sequence[float] = (1.0,),
                     flip: bool = False, on_image: Optional[ImageCallback] = None,
                     desc: str = "eval", progress: bool = True,
                     ctx: Optional[DistContext] = None, amp: str = "none") -> SegmentationMetrics:
    """Predict every image of ``dataset`` (semseg ``tool/test.py`` inference, see
    :mod:`pspnet.inference`) and accumulate the metrics. With a distributed ``ctx``, process r predicts
    images r, r + K, ... and the metric areas are summed over the K processes, so every process returns
    the metrics of the whole dataset (the same numbers as one process).

    Args:
        model: the network (put in eval mode for the duration).
        dataset: yields ``(uint8 RGB [H, W, 3], uint8 label [H, W])``.
        cfg: supplies classes, ignore_label, base_size, test_h, test_w, window_batch.
        scales, flip: inference scales and flip.
        on_image: called as ``on_image(name, image, label, pred int64 [H, W])`` per image.
        desc: progress-bar label.
        progress: show a tqdm bar.
        ctx: the process group (None: one process).
        amp: autocast of the forward passes, resolved (``none``, ``bf16``, ``fp16``: see
            :func:`pspnet.precision.resolve_amp`).
    Returns:
        the filled :class:`SegmentationMetrics`.
    """
    base, indices = base_dataset(dataset)
    names = getattr(base, "names", None)
    metrics = SegmentationMetrics(cfg.classes, cfg.ignore_label)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    device = next(model.parameters()).device
    for j in tqdm(range(rank, len(dataset), world), desc=desc, unit="img", disable=not progress,
                  dynamic_ncols=True, leave=False):
        image, label = dataset[j]
        with autocast(device, amp):
            pred = predict(model, image, cfg.classes, cfg.base_size, (cfg.test_h, cfg.test_w), scales, flip,
                           IMAGENET_MEAN, IMAGENET_STD, cfg.window_batch)
        metrics.update(pred, np.asarray(label))
        if on_image is not None:
            on_image(names[indices[j]] if names is not None else f"{indices[j]:06d}", image, label, pred)
    if ctx is not None and ctx.distributed:
        metrics.reduce(ctx.all_reduce_sum)
    return metrics
