"""The PSPNet of a config: built for training, or loaded from a checkpoint for inference."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .config import TrainConfig
from .distributed import resolve_device
from .loss import PSPLoss, build_criterion
from .models import PSPNet, load_state_dict

__all__ = ["build_model", "load_for_inference", "memory_format"]


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The memory format the config asks the model and its inputs to use (``channels_last``)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def build_model(cfg: TrainConfig, criterion: Optional[PSPLoss] = None) -> PSPNet:
    """``PSPNet`` from the config's model fields (layers, classes, bins, dropout, zoom_factor, fused and its three
    switches, deep_stem), in channels_last memory format when ``cfg.channels_last``.

    Args:
        cfg: the config.
        criterion: the loss handed to the model (semseg ``tool/train.py``: ``PSPNet(..., criterion=criterion)``);
            default :func:`pspnet.loss.build_criterion` of ``cfg``.

    Raises:
        ValueError: no ``criterion`` for a config with ``loss: ce_median_freq`` (its class weights come from
            the training labels: the trainer builds that criterion).
    """
    model = PSPNet(layers=cfg.layers, classes=cfg.classes, bins=tuple(cfg.bins), dropout=cfg.dropout,
                   zoom_factor=cfg.zoom_factor, fused=cfg.fused, deep_stem=cfg.deep_stem,
                   criterion=criterion if criterion is not None else build_criterion(cfg), fused_ppm=cfg.fused_ppm,
                   concat_free_head=cfg.concat_free_head, fused_backbone=cfg.fused_backbone)
    return model.to(memory_format=memory_format(cfg))


def load_for_inference(cfg: TrainConfig, state: dict[str, Any]) -> PSPNet:
    """:func:`build_model` with a checkpoint's weights (ours, semseg's with ``module.``, or a bare
    state_dict), moved to the config's ``device``, in eval mode.

    Raises:
        ValueError: ``device`` cuda without a CUDA device.
        RuntimeError: the checkpoint does not fit the model (lists the mismatched keys).
    """
    device = resolve_device(cfg.device)
    model = build_model(dataclasses.replace(cfg, loss="ce"))     # inference never calls the loss (nor its weights)
    load_state_dict(model, state)
    return model.to(device).eval()
