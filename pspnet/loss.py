"""PSPNet's training loss: the pixel-wise cross-entropy of semseg's ``tool/train.py``
(``nn.CrossEntropyLoss(ignore_index=args.ignore_label)``) on the main and the auxiliary (layer3) logits,
and the deep-supervision total ``main + aux_weight * aux`` (paper Sec. 3.3; semseg ``aux_weight`` 0.4).
Config ``loss: ce_median_freq`` weighs the classes by median-frequency balancing (Eigen & Fergus 2015, the
CamVid standard of SegNet, Badrinarayanan et al. 2017), computed from the training labels.

:func:`build_criterion` is the one place a run's loss is built from its config; the trainer hands it to
:class:`pspnet.models.PSPNet` (``criterion=``), as semseg does, and asks it for the total.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["LOSSES", "LossParts", "PSPLoss", "build_criterion", "median_frequency_weights"]

LOSSES = ("ce", "ce_median_freq")


class LossParts(NamedTuple):
    """The training loss of one batch: ``total = main + aux_weight * aux`` and its two parts (scalar tensors)."""

    total: torch.Tensor
    main: torch.Tensor
    aux: torch.Tensor


class PSPLoss(nn.CrossEntropyLoss):
    """semseg's criterion, ``nn.CrossEntropyLoss(ignore_index=...)``, that also weighs the aux loss.

    Called as ``criterion(logits [N, K, h, w] float, target [N, h, w] int64) -> scalar``: the mean
    cross-entropy over the pixels whose target is not ``ignore_index`` (what :class:`PSPNet` computes for
    its main and aux logits). :meth:`combine` gives the total. It holds no state (no state_dict entries).

    Args:
        ignore_index: target value excluded from the loss (semseg ``ignore_label``: 255).
        aux_weight: weight of the aux loss in the total, finite and >= 0 (semseg: 0.4).
        class_weights: optional float [K] per-class weights (``nn.CrossEntropyLoss(weight=...)``: the mean is
            then weighted by the targets' class weights); kept as a non-persistent buffer, so the model's
            state_dict stays semseg's (the trainer stores the weights in the checkpoint itself).

    Raises:
        ValueError: ``aux_weight`` negative, not finite or not a number; ``class_weights`` not a 1-D tensor
            of finite values >= 0.
        TypeError: ``ignore_index`` not an int.
    """

    def __init__(self, ignore_index: int = 255, aux_weight: float = 0.4,
                 class_weights: Optional[torch.Tensor] = None) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if (isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float))
                or not 0.0 <= float(aux_weight) < math.inf):
            raise ValueError(f"aux_weight must be a finite float >= 0, got {aux_weight!r}")
        if class_weights is not None and (class_weights.dim() != 1 or not torch.isfinite(class_weights).all()
                                          or (class_weights < 0).any()):
            raise ValueError(f"class_weights must be a 1-D tensor of finite values >= 0, got {class_weights!r}")
        super().__init__(ignore_index=ignore_index)
        self.register_buffer("weight", None if class_weights is None else class_weights.float(), persistent=False)
        self.aux_weight = float(aux_weight)

    def combine(self, main_loss: torch.Tensor, aux_loss: torch.Tensor) -> LossParts:
        """``LossParts(main_loss + aux_weight * aux_loss, main_loss, aux_loss)`` of PSPNet's train-mode
        losses (its ``(pred, main_loss, aux_loss)``); the total is what the trainer back-propagates."""
        return LossParts(main_loss + self.aux_weight * aux_loss, main_loss, aux_loss)

    def extra_repr(self) -> str:
        weighted = "" if self.weight is None else f", class_weights={[round(w, 4) for w in self.weight.tolist()]}"
        return f"ignore_index={self.ignore_index}, aux_weight={self.aux_weight}{weighted}"


def median_frequency_weights(labels: Iterable[np.ndarray], classes: int, ignore_index: int) -> torch.Tensor:
    """Median-frequency balancing weights (Eigen & Fergus 2015; SegNet's CamVid weights) from label maps.

    ``freq_c = pixels of class c / pixels of the images in which c appears``, ``weight_c = median(freq) /
    freq_c`` (median over the classes that appear): rare classes weigh more, the median class 1.

    Args:
        labels: integer label maps [H, W] (class indices, ``ignore_index`` excluded).
        classes: K.
        ignore_index: the void label.
    Returns:
        float32 [K]; 0 for a class that appears in no label map.
    Raises:
        ValueError: a label outside [0, K) other than ``ignore_index``, or no labelled pixel at all.
    """
    pixels = np.zeros(classes, dtype=np.int64)
    present_total = np.zeros(classes, dtype=np.int64)
    for label in labels:
        label = np.asarray(label)
        valid = label[label != ignore_index].astype(np.int64)
        if valid.size and (valid.min() < 0 or valid.max() >= classes):
            raise ValueError(f"label values must be in [0, {classes}) or {ignore_index}, "
                             f"got {valid.min()}..{valid.max()}")
        counts = np.bincount(valid, minlength=classes)
        pixels += counts
        present_total[counts > 0] += valid.size
    present = present_total > 0
    if not present.any():
        raise ValueError("no labelled pixel: median-frequency weights need at least one class")
    freq = pixels[present] / present_total[present]
    weights = np.zeros(classes)
    weights[present] = np.median(freq) / freq
    return torch.tensor(weights, dtype=torch.float32)


def build_criterion(cfg: TrainConfig, class_weights: Optional[torch.Tensor] = None) -> PSPLoss:
    """The loss of a run: :class:`PSPLoss` with the config's ``ignore_label`` and ``aux_weight``, and for
    ``loss: ce_median_freq`` the ``class_weights`` (:func:`median_frequency_weights` of the training labels).

    Raises:
        ValueError: ``ce_median_freq`` without ``class_weights``, or ``ce`` with them.
    """
    if (cfg.loss == "ce_median_freq") != (class_weights is not None):
        raise ValueError(f"config key 'loss': {cfg.loss} {'needs' if class_weights is None else 'takes no'} "
                         "class weights")
    return PSPLoss(ignore_index=cfg.ignore_label, aux_weight=cfg.aux_weight, class_weights=class_weights)
