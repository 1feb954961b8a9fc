"""PSPNet's training loss: the pixel-wise cross-entropy of semseg's ``tool/train.py``
(``nn.CrossEntropyLoss(ignore_index=args.ignore_label)``) on the main and the auxiliary (layer3) logits,
and the deep-supervision total ``main + aux_weight * aux`` (paper Sec. 3.3; semseg ``aux_weight`` 0.4).

:func:`build_criterion` is the one place a run's loss is built from its config; the trainer hands it to
:class:`pspnet.models.PSPNet` (``criterion=``), as semseg does, and asks it for the total.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["LossParts", "PSPLoss", "build_criterion"]


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

    Raises:
        ValueError: ``aux_weight`` negative, not finite or not a number.
        TypeError: ``ignore_index`` not an int.
    """

    def __init__(self, ignore_index: int = 255, aux_weight: float = 0.4) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if (isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float))
                or not 0.0 <= float(aux_weight) < math.inf):
            raise ValueError(f"aux_weight must be a finite float >= 0, got {aux_weight!r}")
        super().__init__(ignore_index=ignore_index)
        self.aux_weight = float(aux_weight)

    def combine(self, main_loss: torch.Tensor, aux_loss: torch.Tensor) -> LossParts:
        """``LossParts(main_loss + aux_weight * aux_loss, main_loss, aux_loss)`` of PSPNet's train-mode
        losses (its ``(pred, main_loss, aux_loss)``); the total is what the trainer back-propagates."""
        return LossParts(main_loss + self.aux_weight * aux_loss, main_loss, aux_loss)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, aux_weight={self.aux_weight}"


def build_criterion(cfg: TrainConfig) -> PSPLoss:
    """The loss of a run: :class:`PSPLoss` with the config's ``ignore_label`` and ``aux_weight``."""
    return PSPLoss(ignore_index=cfg.ignore_label, aux_weight=cfg.aux_weight)
