"""The datasets of a config (the training split with semseg's augmentation, evaluation splits without) and
the training DataLoader."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import ConfigError, TrainConfig
from .data import IMAGENET_MEAN, IMAGENET_STD, open_dataset, seed_worker, train_transform
from .sampler import EpochSampler

__all__ = ["limit_dataset", "base_dataset", "build_train_set", "build_eval_set", "build_train_loader"]


def limit_dataset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """The first ``limit`` items of ``dataset`` as a Subset (None or >= len: the dataset itself)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def base_dataset(dataset: Dataset) -> tuple[Any, list[int]]:
    """``(underlying dataset, index map)`` of a possibly nested Subset (for names / palette)."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _check_classes(dataset: Any, cfg: TrainConfig) -> None:
    if getattr(dataset, "num_classes", cfg.classes) != cfg.classes:
        raise ConfigError(f"config key 'classes': {cfg.classes} but the dataset at {cfg.data_root} "
                          f"has {dataset.num_classes} classes")


def _open(cfg: TrainConfig, split: str, transform=None) -> Dataset:
    ds = open_dataset(cfg.dataset, cfg.data_root, split, transform, cache=cfg.cache_data, num_classes=cfg.classes)
    _check_classes(ds, cfg)
    return ds


def build_train_set(cfg: TrainConfig) -> Dataset:
    """The ``dataset``'s ``train`` split with semseg's augmentation (crop train_h x train_w, scale,
    rotate), limited to ``max_samples``.

    Raises:
        FileNotFoundError / ValueError: from the dataset (missing folder, list or partner file, ...).
        ConfigError: the dataset's class count differs from ``classes``.
    """
    transform = train_transform((cfg.train_h, cfg.train_w), scale=(cfg.scale_min, cfg.scale_max),
                                rotate=(cfg.rotate_min, cfg.rotate_max), mean=IMAGENET_MEAN,
                                std=IMAGENET_STD, ignore_label=cfg.ignore_label)
    return limit_dataset(_open(cfg, "train", transform), cfg.max_samples)


def build_eval_set(cfg: TrainConfig, split: str = "val", limit: Optional[int] = None) -> Dataset:
    """The ``dataset``'s ``split`` without transform (uint8 RGB image, uint8 label), first ``limit`` items."""
    return limit_dataset(_open(cfg, split), limit)


def build_train_loader(dataset: Dataset, cfg: TrainConfig, sampler: EpochSampler) -> DataLoader:
    """DataLoader with semseg's settings (``drop_last=True``, ``worker_init_fn=seed_worker``, seeded
    generator) and our resumable shuffling sampler, whose share of each global batch (``batch_size /
    world_size`` images) is one loader batch; the generator's seed is offset by the rank so that processes
    draw different augmentations. With workers and ``cache_data`` the cache is filled first so that forked
    workers share it; workers persist across epochs."""
    if cfg.workers > 0 and cfg.cache_data:
        base, indices = base_dataset(dataset)
        if len(indices) == len(base) and hasattr(base, "preload"):
            base.preload()
        else:
            for i in range(len(dataset)):
                dataset[i]  # fills the cache of the underlying items
    generator = torch.Generator().manual_seed(int(sampler.seed) + sampler.rank)
    return DataLoader(dataset, batch_size=sampler.batch_size // sampler.world_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=cfg.workers > 0)
