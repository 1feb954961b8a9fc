"""semseg's optimizer (``tool/train.py``): SGD over one parameter group per backbone stage at the base LR and
one per head module at ``head_lr_mult`` times it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import TrainConfig

__all__ = ["BACKBONE", "HEAD", "param_groups", "build_optimizer"]

BACKBONE = ("layer0", "layer1", "layer2", "layer3", "layer4")
HEAD = ("ppm", "cls", "aux")


def param_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]]:
    """semseg's SGD parameter groups: one per ``layer0..layer4`` (``lr_mult`` 1), then one per
    ``ppm, cls, aux`` (``lr_mult = head_lr_mult``, semseg: 10; ``index_split = 5``).

    Raises:
        ValueError: the model lacks one of these submodules, or has parameters outside them (they
            would silently not be trained).
    """
    groups, covered = [], set()
    for names, mult in ((BACKBONE, 1.0), (HEAD, float(head_lr_mult))):
        for name in names:
            module = getattr(model, name, None)
            if not isinstance(module, nn.Module):
                raise ValueError(f"model has no submodule '{name}' (expected semseg's PSPNet layout)")
            params = list(module.parameters())
            covered.update(id(p) for p in params)
            groups.append({"params": params, "name": name, "lr_mult": mult})
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise ValueError(f"parameters outside {BACKBONE + HEAD}: {stray[:5]}")
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD(momentum, weight_decay on every parameter) over :func:`param_groups`, each group at
    ``base_lr * lr_mult`` (semseg ``tool/train.py``)."""
    groups = param_groups(model, cfg.head_lr_mult)
    for g in groups:
        g["lr"] = cfg.base_lr * g["lr_mult"]
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
