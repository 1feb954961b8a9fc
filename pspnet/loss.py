"""PSPNet's training loss: the pixel-wise cross-entropy of semseg's ``tool/train.py``
(``nn.CrossEntropyLoss(ignore_index=args.ignore_label)``) on the main and the auxiliary (layer3) logits,
and the deep-supervision total ``main + aux_weight * aux`` (paper Sec. 3.3; semseg ``aux_weight`` 0.4).
Config ``loss: ce_median_freq`` weighs the classes by median-frequency balancing (Eigen & Fergus 2015, the
CamVid standard of SegNet, Badrinarayanan et al. 2017), computed from the training labels; ``ohem_thresh``
trains on the hard pixels only (online hard example mining, as mmsegmentation's ``OHEMPixelSampler``).

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
        ohem_thresh: online hard example mining (mmsegmentation's ``OHEMPixelSampler``; Shrivastava et al.
            2016): per call, only the labelled pixels whose softmax probability of their true class is at most
            ``max(ohem_thresh, p_k)`` count, ``p_k`` being the ``ohem_min_kept``-th smallest such probability
            (so at least ``ohem_min_kept`` pixels are kept); the loss is their (weighted) mean. None = every
            labelled pixel. In (0, 1].
        ohem_min_kept: the least number of pixels OHEM keeps per call (mmseg's ``min_kept``), >= 1.

    Raises:
        ValueError: ``aux_weight`` negative, not finite or not a number; ``class_weights`` not a 1-D tensor
            of finite values >= 0; ``ohem_thresh`` outside (0, 1]; ``ohem_min_kept`` < 1.
        TypeError: ``ignore_index`` not an int.
    """

    def __init__(self, ignore_index: int = 255, aux_weight: float = 0.4,
                 class_weights: Optional[torch.Tensor] = None, ohem_thresh: Optional[float] = None,
                 ohem_min_kept: int = 100000) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if (isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float))
                or not 0.0 <= float(aux_weight) < math.inf):
            raise ValueError(f"aux_weight must be a finite float >= 0, got {aux_weight!r}")
        if class_weights is not None and (class_weights.dim() != 1 or not torch.isfinite(class_weights).all()
                                          or (class_weights < 0).any()):
            raise ValueError(f"class_weights must be a 1-D tensor of finite values >= 0, got {class_weights!r}")
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh must be in (0, 1] or None, got {ohem_thresh!r}")
        if isinstance(ohem_min_kept, bool) or not isinstance(ohem_min_kept, int) or ohem_min_kept < 1:
            raise ValueError(f"ohem_min_kept must be an int >= 1, got {ohem_min_kept!r}")
        super().__init__(ignore_index=ignore_index)
        self.register_buffer("weight", None if class_weights is None else class_weights.float(), persistent=False)
        self.aux_weight = float(aux_weight)
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of ``logits`` [N, K, h, w] against ``target`` [N, h, w] (int64) over the
        labelled pixels, or with OHEM over the hard ones (see the class docstring). Scalar."""
        if self.ohem_thresh is None:
            return super().forward(logits, target)
        with torch.no_grad():
            labelled = target != self.ignore_index
            true_prob = logits.detach().float().softmax(1).gather(1, (target * labelled).unsqueeze(1)).squeeze(1)
            candidates = true_prob[labelled]
            if candidates.numel() == 0:
                return super().forward(logits, target)
            kth = torch.kthvalue(candidates, min(self.ohem_min_kept, candidates.numel())).values
            threshold = torch.clamp(kth, min=self.ohem_thresh)
            hard = target.masked_fill(~(labelled & (true_prob <= threshold)), self.ignore_index)
        return super().forward(logits, hard)

    def combine(self, main_loss: torch.Tensor, aux_loss: torch.Tensor) -> LossParts:
        """``LossParts(main_loss + aux_weight * aux_loss, main_loss, aux_loss)`` of PSPNet's train-mode
        losses (its ``(pred, main_loss, aux_loss)``); the total is what the trainer back-propagates."""
        return LossParts(main_loss + self.aux_weight * aux_loss, main_loss, aux_loss)

    def extra_repr(self) -> str:
        weighted = "" if self.weight is None else f", class_weights={[round(w, 4) for w in self.weight.tolist()]}"
        ohem = ("" if self.ohem_thresh is None
                else f", ohem_thresh={self.ohem_thresh}, ohem_min_kept={self.ohem_min_kept}")
        return f"ignore_index={self.ignore_index}, aux_weight={self.aux_weight}{weighted}{ohem}"


def median_frequency_weights(labels: Iterable[np.ndarray], classes: int, ignore_index: int,
                             power: float = 1.0) -> torch.Tensor:
    """Median-frequency balancing weights (Eigen & Fergus 2015; SegNet's CamVid weights) from label maps.

    ``freq_c = pixels of class c / pixels of the images in which c appears``, ``weight_c = (median(freq) /
    freq_c) ** power`` (median over the classes that appear): rare classes weigh more, the median class 1.
    ``power`` 1 is SegNet's balancing; a power below 1 softens it (0.5: the square root), 0 is no weighting.

    Args:
        labels: integer label maps [H, W] (class indices, ``ignore_index`` excluded).
        classes: K.
        ignore_index: the void label.
        power: exponent of the balancing, finite and >= 0.
    Returns:
        float32 [K]; 0 for a class that appears in no label map.
    Raises:
        ValueError: a label outside [0, K) other than ``ignore_index``, no labelled pixel at all, or ``power``
            negative or not finite.
    """
    if not 0.0 <= power < math.inf:
        raise ValueError(f"power must be a finite float >= 0, got {power!r}")
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
    weights[present] = (np.median(freq) / freq) ** power
    return torch.tensor(weights, dtype=torch.float32)


def build_criterion(cfg: TrainConfig, class_weights: Optional[torch.Tensor] = None) -> PSPLoss:
    """The loss of a run: :class:`PSPLoss` with the config's ``ignore_label``, ``aux_weight`` and OHEM keys, and for
    ``loss: ce_median_freq`` the ``class_weights`` (:func:`median_frequency_weights` of the training labels).

    Raises:
        ValueError: ``ce_median_freq`` without ``class_weights``, or ``ce`` with them.
    """
    if (cfg.loss == "ce_median_freq") != (class_weights is not None):
        raise ValueError(f"config key 'loss': {cfg.loss} {'needs' if class_weights is None else 'takes no'} "
                         "class weights")
    return PSPLoss(ignore_index=cfg.ignore_label, aux_weight=cfg.aux_weight, class_weights=class_weights,
                   ohem_thresh=cfg.ohem_thresh, ohem_min_kept=cfg.ohem_min_kept)
