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
from .distributed import DistContext
from .inference import predict
from .metrics import SegmentationMetrics

__all__ = ["set_seed", "get_rng_state", "set_rng_state", "build_model", "load_for_inference", "param_groups",
           "build_optimizer", "poly_lr", "set_poly_lr", "EpochSampler", "limit_dataset", "base_dataset",
           "build_train_set", "build_eval_set", "build_train_loader", "evaluate_dataset", "write_report", "JsonlLog"]


# ---------------------------------------------------------------------------- randomness

def set_seed(seed: int) -> None:
    """Seed python ``random`` (used by the transforms), numpy and torch (semseg ``tool/train.py``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Current python / numpy / torch (CPU, and the current CUDA device's when CUDA is in use) RNG states,
    in a form ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


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
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
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


def load_for_inference(cfg: TrainConfig, state: dict[str, Any]) -> nn.Module:
    """:func:`build_model` with a checkpoint's weights (ours, semseg's with ``module.``, or a bare
    state_dict), moved to the config's ``device``, in eval mode.

    Raises:
        ValueError: ``device`` cuda without a CUDA device.
        RuntimeError: the checkpoint does not fit the model (lists the mismatched keys).
    """
    from pspnet.distributed import resolve_device
    from pspnet.models import load_state_dict
    device = resolve_device(cfg.device)
    model = build_model(cfg)
    load_state_dict(model, state)
    return model.to(device).eval()


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
    """Shuffled indices that depend only on ``(seed, epoch)``, cut into global batches of ``batch_size``
    (the tail that fills no batch is dropped, ``drop_last``), of which this process takes its share.

    Global batch i is ``permutation[i * B:(i + 1) * B]`` whatever the number of processes; process r of K
    yields elements ``r * B/K`` to ``(r + 1) * B/K - 1`` of every batch (the role of
    ``DistributedSampler``), so K processes see together exactly the batches one process would. An epoch
    interrupted after k batches resumes exactly with ``set_epoch(epoch, skip=k * B)``.

    Args:
        num_samples: dataset length.
        seed: base seed (the same on every process).
        batch_size: global batch B (default 1: every index, one at a time).
        rank, world_size: this process and the number of processes; ``world_size`` must divide B.
    Raises:
        ValueError: ``world_size`` does not divide ``batch_size``, or ``rank`` is outside [0, world_size).
    """

    def __init__(self, num_samples: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the permutation of ``epoch`` and drop its first ``skip`` indices (a multiple of the
        global batch)."""
        if not 0 <= skip <= self.num_samples or skip % self.batch_size:
            raise ValueError(f"skip must be a multiple of {self.batch_size} in [0, {self.num_samples}], got {skip}")
        self.epoch, self.skip = int(epoch), int(skip)

    def permutation(self, epoch: int) -> list[int]:
        """The full index order of ``epoch`` (the same on every process)."""
        mixed = np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(2, np.uint64)
        g = torch.Generator().manual_seed(int(mixed[0] % 2**63))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order, share = self.permutation(self.epoch), self.batch_size // self.world_size
        for start in range(self.skip, self.num_samples - self.batch_size + 1, self.batch_size):
            yield from order[start + self.rank * share:start + (self.rank + 1) * share]

    def __len__(self) -> int:
        batches = (self.num_samples - self.skip) // self.batch_size
        return batches * (self.batch_size // self.world_size)


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
    generator) and our resumable shuffling sampler, whose share of each global batch (``batch_size /
    world_size`` images) is one loader batch; the generator's seed is offset by the rank so that processes
    draw different augmentations. With workers and ``cache_data`` the cache is filled first so that forked
    workers share it; workers persist across epochs."""
    from pspnet.data import seed_worker
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


# ---------------------------------------------------------------------------- evaluation

ImageCallback = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]

def evaluate_dataset(model: nn.Module, dataset: Dataset, cfg: TrainConfig, scales: Sequence[float] = (1.0,),
                     flip: bool = False, on_image: Optional[ImageCallback] = None,
                     desc: str = "eval", progress: bool = True,
                     ctx: Optional[DistContext] = None) -> SegmentationMetrics:
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
    Returns:
        the filled :class:`SegmentationMetrics`.
    """
    from pspnet.data import IMAGENET_MEAN, IMAGENET_STD
    base, indices = base_dataset(dataset)
    names = getattr(base, "names", None)
    metrics = SegmentationMetrics(cfg.classes, cfg.ignore_label)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    for j in tqdm(range(rank, len(dataset), world), desc=desc, unit="img", disable=not progress,
                  dynamic_ncols=True, leave=False):
        image, label = dataset[j]
        pred = predict(model, image, cfg.classes, cfg.base_size, (cfg.test_h, cfg.test_w), scales, flip,
                       IMAGENET_MEAN, IMAGENET_STD, cfg.window_batch)
        metrics.update(pred, np.asarray(label))
        if on_image is not None:
            on_image(names[indices[j]] if names is not None else f"{indices[j]:06d}", image, label, pred)
    if ctx is not None and ctx.distributed:
        metrics.reduce(ctx.all_reduce_sum)
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
