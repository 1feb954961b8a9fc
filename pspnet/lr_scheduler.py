"""semseg's poly learning-rate schedule as a ``torch.optim.lr_scheduler.LRScheduler``, stepped once per
iteration (after ``optimizer.step()``), and its restoration from a checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["PolyLR", "LRSchedulerFactory", "build_lr_scheduler", "restore_lr_scheduler"]

LRSchedulerFactory = Callable[[torch.optim.Optimizer, int], LRScheduler]
"""``factory(optimizer, max_iter) -> LRScheduler``: how the trainer builds its schedule (default
:func:`build_lr_scheduler` of the config); the scheduler is stepped once after every iteration."""


class PolyLR(LRScheduler):
    """semseg's poly LR (``util/util.py: poly_learning_rate`` and the group loop of ``tool/train.py``).

    After ``it`` iterations (``last_epoch`` counts iterations) every parameter group ``g`` runs at
    ``lr = base_lr * (1 - it / max_iter) ** power * g["lr_mult"]`` (``lr_mult`` 1 where a group has none;
    :func:`pspnet.optim.param_groups` gives the head groups ``head_lr_mult``, semseg: 10), and at 0 from
    ``max_iter`` on. The product is formed in that order, as semseg does, so the values are semseg's to the
    bit.

    :meth:`state_dict` holds the position (``last_epoch``) and the schedule; :meth:`load_state_dict` takes
    only the position, so a run resumed with a longer ``max_iter`` (``epochs`` / ``max_iters`` may change
    on resume) follows the new schedule from where it stopped, and sets every group's lr for it.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is set.
        base_lr: LR at iteration 0 of groups with ``lr_mult`` 1, > 0.
        max_iter: iterations of the whole run, >= 1.
        power: exponent, >= 0 (semseg: 0.9).
        last_epoch: iterations already done; -1 (default) for a fresh schedule (PyTorch's convention).

    Raises:
        ValueError: ``base_lr``, ``max_iter`` or ``power`` out of range (the message names it).
    """

    _SCHEDULE = ("base_lr", "max_iter", "power")

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, max_iter: int, power: float = 0.9,
                 last_epoch: int = -1) -> None:
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if not power >= 0:
            raise ValueError(f"power must be >= 0, got {power!r}")
        self.base_lr, self.max_iter, self.power = float(base_lr), max_iter, float(power)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int) -> list[float]:
        """Every group's lr after ``iteration`` iterations (no side effect)."""
        lr = self.base_lr * max(1.0 - iteration / self.max_iter, 0.0) ** self.power
        return [lr * group.get("lr_mult", 1.0) for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        """The lrs at the current position (``LRScheduler``'s hook, called by :meth:`step`)."""
        return self.lr_at(self.last_epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the position from ``state_dict`` (a :meth:`state_dict`, or just ``{"last_epoch": it}``),
        keep this scheduler's ``base_lr``, ``max_iter`` and ``power``, and set every group's lr for it.

        Raises:
            KeyError: ``state_dict`` has no ``last_epoch``.
        """
        position = int(state_dict["last_epoch"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._SCHEDULE})
        self.last_epoch = position
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(position)):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig", max_iter: int) -> PolyLR:
    """The run's schedule: :class:`PolyLR` with the config's ``base_lr`` and ``power`` over ``max_iter``
    iterations (at iteration 0; the trainer restores a resumed run's position)."""
    return PolyLR(optimizer, cfg.base_lr, max_iter, cfg.power)


def restore_lr_scheduler(scheduler: LRScheduler, state: Optional[dict[str, Any]], iteration: int) -> None:
    """Put ``scheduler`` where a checkpoint left it.

    Args:
        scheduler: the freshly built schedule of the resumed run.
        state: the checkpoint's ``lr_scheduler`` entry, or None for checkpoints written before the schedule
            was saved; those were all trained with the poly LR, which is then placed at ``iteration``.
        iteration: the checkpoint's completed iterations.

    Raises:
        ValueError: ``state`` is None and ``scheduler`` is not a :class:`PolyLR` (its position cannot be
            derived from the iteration).
    """
    if state is not None:
        scheduler.load_state_dict(state)
    elif isinstance(scheduler, PolyLR):
        scheduler.load_state_dict({"last_epoch": iteration})
    else:
        raise ValueError(f"the checkpoint holds no LR scheduler state, so a {type(scheduler).__name__} cannot be "
                         f"restored; only PolyLR is rebuilt from the iteration")
