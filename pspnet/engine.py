"""Building blocks shared by ``pspnet.train`` and ``pspnet.evaluate``: model / optimizer / data
construction with semseg's recipe (``tool/train.py``), the poly LR schedule, reproducible sampling,
RNG state capture, dataset evaluation (``tool/test.py``) and report writing."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .checkpoint import atomic_write
from .config import ConfigError, TrainConfig
from .inference import predict
from .metrics import SegmentationMetrics

__all__ = ["set_seed", "get_rng_state", "set_rng_state", "build_model", "param_groups", "build_optimizer",
           "poly_lr", "set_poly_lr", "EpochSampler", "limit_dataset", "base_dataset", "build_train_set",
           "build_eval_set", "build_train_loader", "evaluate_dataset", "write_report", "JsonlLog"]


# ---------------------------------------------------------------------------- randomness

def set_seed(seed: int) -> None:
    """Seed python ``random`` (used by the transforms), numpy and torch (semseg ``tool/train.py``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Current python / numpy / torch RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_state`.

    Raises:
        ValueError: ``state`` is missing a part or is malformed.
    """
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["numpy"]
        np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"malformed RNG state in checkpoint: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------- model and optimiser

def build_model(cfg: TrainConfig) -> nn.Module:
    """``pspnet.models.PSPNet`` from the config's model fields (layers, classes, bins, dropout,
    zoom_factor, aux_weight, fused, deep_stem), in channels_last memory format when ``cfg.channels_last``."""
    from pspnet.models import PSPNet
    model = PSPNet(layers=cfg.layers, classes=cfg.classes, bins=tuple(cfg.bins), dropout=cfg.dropout,
                   zoom_factor=cfg.zoom_factor, aux_weight=cfg.aux_weight, fused=cfg.fused, deep_stem=cfg.deep_stem)
    return model.to(memory_format=memory_format(cfg))


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The memory format the config asks the model and its inputs to use."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


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


# ---------------------------------------------------------------------------- data

class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on ``(seed, epoch)``, optionally skipping the first
    ``skip`` samples: an epoch interrupted after k batches of size b resumes exactly with
    ``set_epoch(epoch, skip=k * b)`` (with ``drop_last=True`` batches are consecutive chunks).

    Args:
        num_samples: dataset length.
        seed: base seed.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the permutation of ``epoch`` and drop its first ``skip`` indices."""
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        self.epoch, self.skip = int(epoch), int(skip)

    def permutation(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``."""
        mixed = np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(2, np.uint64)
        g = torch.Generator().manual_seed(int(mixed[0] % 2**63))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation(self.epoch)[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


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
    from pspnet.data.datasets import open_dataset
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
    from pspnet.data import IMAGENET_MEAN, IMAGENET_STD, train_transform
    transform = train_transform((cfg.train_h, cfg.train_w), scale=(cfg.scale_min, cfg.scale_max),
                                rotate=(cfg.rotate_min, cfg.rotate_max), mean=IMAGENET_MEAN,
                                std=IMAGENET_STD, ignore_label=cfg.ignore_label)
    return limit_dataset(_open(cfg, "train", transform), cfg.max_samples)


def build_eval_set(cfg: TrainConfig, split: str = "val", limit: Optional[int] = None) -> Dataset:
    """The ``dataset``'s ``split`` without transform (uint8 RGB image, uint8 label), first ``limit`` items."""
    return limit_dataset(_open(cfg, split), limit)


def build_train_loader(dataset: Dataset, cfg: TrainConfig, sampler: EpochSampler) -> DataLoader:
    """DataLoader with semseg's settings (``drop_last=True``, ``worker_init_fn=seed_worker``, seeded
    generator) and our resumable shuffling sampler. With workers and ``cache_data`` the cache is filled
    first so that forked workers share it; workers persist across epochs."""
    from pspnet.data import seed_worker
    if cfg.workers > 0 and cfg.cache_data:
        base, indices = base_dataset(dataset)
        if len(indices) == len(base) and hasattr(base, "preload"):
            base.preload()
        else:
            for i in range(len(dataset)):
                dataset[i]  # fills the cache of the underlying items
    generator = torch.Generator().manual_seed(int(sampler.seed))
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=cfg.workers > 0)


# ---------------------------------------------------------------------------- evaluation

ImageCallback = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]

def evaluate_dataset(model: nn.Module, dataset: Dataset, cfg: TrainConfig, scales: Sequence[float] = (1.0,),
                     flip: bool = False, on_image: Optional[ImageCallback] = None,
                     desc: str = "eval", progress: bool = True) -> SegmentationMetrics:
    """Predict every image of ``dataset`` (semseg ``tool/test.py`` inference, see
    :mod:`pspnet.inference`) and accumulate the metrics.

    Args:
        model: the network (put in eval mode for the duration).
        dataset: yields ``(uint8 RGB [H, W, 3], uint8 label [H, W])``.
        cfg: supplies classes, ignore_label, base_size, test_h, test_w, window_batch.
        scales, flip: inference scales and flip.
        on_image: called as ``on_image(name, image, label, pred int64 [H, W])`` per image.
        desc: progress-bar label.
        progress: show a tqdm bar.
    Returns:
        the filled :class:`SegmentationMetrics`.
    """
    from pspnet.data import IMAGENET_MEAN, IMAGENET_STD
    base, indices = base_dataset(dataset)
    names = getattr(base, "names", None)
    metrics = SegmentationMetrics(cfg.classes, cfg.ignore_label)
    for j in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
                  leave=False):
        image, label = dataset[j]
        pred = predict(model, image, cfg.classes, cfg.base_size, (cfg.test_h, cfg.test_w), scales, flip,
                       IMAGENET_MEAN, IMAGENET_STD, cfg.window_batch)
        metrics.update(pred, np.asarray(label))
        if on_image is not None:
            on_image(names[indices[j]] if names is not None else f"{indices[j]:06d}", image, label, pred)
    return metrics


def write_report(directory: os.PathLike | str, stem: str, metrics: dict[str, Any], table: str,
                 info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (metrics + info) and ``<stem>.md`` (info + per-class table) atomically.

    Returns:
        the two paths.
    """
    directory = Path(directory)
    payload = {**info, **metrics}
    json_path = atomic_write(directory / f"{stem}.json", lambda f: json.dump(payload, f, indent=2), mode="w")
    lines = [f"# {stem}", ""] + [f"- {k}: {v}" for k, v in info.items()] + [
        "", f"mIoU/mAcc/allAcc {metrics['miou']:.4f}/{metrics['macc']:.4f}/{metrics['allacc']:.4f}", "", table, ""]
    md_path = atomic_write(directory / f"{stem}.md", lambda f: f.write("\n".join(lines)), mode="w")
    return json_path, md_path


class JsonlLog:
    """Append-only JSON-lines log (one object per line, flushed after each write).

    Args:
        path: log file; its folder is created; an existing file is appended to, never truncated.
    """

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (must be JSON-serialisable; NaN/inf written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
