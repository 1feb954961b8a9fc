"""semseg's poly learning-rate schedule (``util/util.py: poly_learning_rate``), set after every step."""

from __future__ import annotations

import torch

from .config import TrainConfig

__all__ = ["poly_lr", "set_poly_lr"]


def poly_lr(base_lr: float, curr_iter: int, max_iter: int, power: float = 0.9) -> float:
    """``base_lr * (1 - curr_iter / max_iter) ** power`` (semseg ``util/util.py: poly_learning_rate``);
    0 at and after ``max_iter``."""
    return base_lr * max(1.0 - curr_iter / max_iter, 0.0) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, curr_iter: int, max_iter: int) -> float:
    """Set every group's lr to ``poly_lr(...) * lr_mult``; called after each ``optimizer.step()`` with
    ``curr_iter`` = iterations done so far (semseg). Returns the backbone lr."""
    lr = poly_lr(cfg.base_lr, curr_iter, max_iter, cfg.power)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
