"""The training loop of semseg ``tool/train.py``, in one process (CPU or one GPU) or one process per GPU
under ``torchrun`` (DistributedDataParallel; see :mod:`pspnet.distributed`): SGD + poly LR scheduler stepped
per iteration (:mod:`pspnet.lr_scheduler`), the config's loss (:mod:`pspnet.loss`: main + aux_weight * aux),
optional bf16/fp16 autocast, periodic atomic checkpoints and the JSONL log (rank 0 only), validation with
``pspnet.inference`` sharded over the processes with the metric areas summed across them, exact resume
(model, optimizer, LR scheduler, loss scaler, iteration, every process's RNG, data order)."""

from __future__ import annotations

import math
import random
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import (FINAL_NAME, CheckpointError, epoch_checkpoint_name, latest_checkpoint, list_checkpoints,
                         load_checkpoint, prune, save_checkpoint)
from .config import ConfigError, TrainConfig, resume_free_keys
from .distributed import setup
from .eval_loop import evaluate_dataset
from .precision import autocast, grad_scaler, resolve_amp
from .jsonl_log import JsonlLog
from .loaders import base_dataset, build_eval_set, build_train_loader, build_train_set
from .loss import build_criterion, median_frequency_weights
from .lr_scheduler import LRSchedulerFactory, build_lr_scheduler, restore_lr_scheduler
from .modeling import build_model, memory_format
from .optim import build_optimizer
from .report import write_report
from .runtime import configure_process
from .rng import get_rng_state, set_rng_state, set_seed
from .sampler import EpochSampler
from .models import load_backbone, load_state_dict

__all__ = ["Trainer"]


class _Window:
    """Loss / throughput sums since the last log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = self.images = 0
        self.loss = self.main = self.aux = 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, main: float, aux: float, images: int) -> None:
        self.n += 1
        self.images += images
        self.loss += loss
        self.main += main
        self.aux += aux

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and trains (``run``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the process group, wraps the model in
    DistributedDataParallel (SyncBatchNorm first on CUDA with ``sync_bn``) and gives each process
    ``batch_size / world_size`` images of every global batch; rank 0 alone logs and writes files. The
    caller leaves the group afterwards (``pspnet.distributed.cleanup``).

    Args:
        cfg: validated config; ``cfg.seed`` None is replaced by a drawn seed (stored in checkpoints).
        progress: show tqdm bars (rank 0 only).
        lr_scheduler: ``factory(optimizer, max_iter) -> torch.optim.lr_scheduler.LRScheduler``, stepped once
            after every iteration and saved in checkpoints; default :func:`pspnet.lr_scheduler.build_lr_scheduler`
            (semseg's poly LR from the config).

    Raises:
        ConfigError: a fresh run would write into a ``save_path`` that already holds checkpoints
            (without ``overwrite``), the batch is larger than the dataset or not divisible into shares of
            >= 2 images per process, or the dataset's classes differ.
        ValueError: ``device`` cuda without a CUDA device.
        FileNotFoundError / CheckpointError: ``resume`` names a missing or unreadable checkpoint.
        RuntimeError: the resume checkpoint does not fit the model built from the config.
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True,
                 lr_scheduler: Optional[LRSchedulerFactory] = None) -> None:
        self.cfg = cfg
        configure_process(cfg)
        self.ctx = ctx = setup(cfg.device)
        self.progress = progress and ctx.is_main
        if cfg.batch_size % ctx.world_size or cfg.batch_size // ctx.world_size < 2:
            raise ConfigError(f"config key 'batch_size': the global batch {cfg.batch_size} must split into "
                              f"{ctx.world_size} equal shares of at least 2 images (one per process)")
        self.save_dir = Path(cfg.save_path)
        state, self.resumed_from = self._resolve_resume()
        if cfg.seed is None:  # a resumed run keeps its data order; a fresh one draws and records a seed
            saved = (state or {}).get("config", {}).get("seed")
            drawn = saved if saved is not None else random.SystemRandom().randrange(2**31)
            cfg.seed = int(ctx.all_gather_object(drawn)[0])  # rank 0's draw on every process
        set_seed(cfg.seed + ctx.rank)  # per-process augmentation and dropout; DDP copies rank 0's weights
        self.train_set = build_train_set(cfg)
        base = base_dataset(self.train_set)[0]
        self._class_info = {"classes": list(getattr(base, "classes", [])),  # for pspnet.predict's colours and names
                            "palette": np.asarray(getattr(base, "palette", np.zeros((0, 3)))).astype(int).tolist()}
        self.iters_per_epoch = len(self.train_set) // cfg.batch_size
        if self.iters_per_epoch == 0:
            raise ConfigError(f"config key 'batch_size': {cfg.batch_size} is larger than the "
                              f"{len(self.train_set)} training images (drop_last=True leaves no batch)")
        self.max_iter = cfg.epochs * self.iters_per_epoch
        if cfg.max_iters is not None:
            self.max_iter = min(self.max_iter, cfg.max_iters)
        self.class_weights = self._class_weights(state)
        self.criterion = build_criterion(cfg, self.class_weights)
        self.model = build_model(cfg, self.criterion).to(ctx.device)
        if ctx.distributed and ctx.device.type == "cuda" and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.memory_format = memory_format(cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.lr_scheduler = (build_lr_scheduler(self.optimizer, cfg, self.max_iter) if lr_scheduler is None
                             else lr_scheduler(self.optimizer, self.max_iter))
        self.amp, self.amp_reason = resolve_amp(cfg.amp, ctx.device)      # none | bf16 | fp16
        self.scaler = grad_scaler(ctx.device, self.amp)
        self.iteration = 0
        self.best: dict[str, Any] = {}
        self.last_metrics: Optional[dict[str, Any]] = None
        if state is not None:
            self._restore(state, self.resumed_from)
        elif cfg.backbone_weights is not None:
            load_backbone(self.model, cfg.backbone_weights)
        self.net: nn.Module = self.model  # what the training step calls: the DDP wrapper when distributed
        if ctx.distributed:
            self.net = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None)
        self.sampler = EpochSampler(len(self.train_set), cfg.seed, cfg.batch_size, ctx.rank, ctx.world_size)
        self.loader = build_train_loader(self.train_set, cfg, self.sampler)
        self.val_set = None
        self._last_table = ""
        self.log = JsonlLog(self.save_dir / "log.jsonl") if ctx.is_main else None
        self.start_time = time.perf_counter()

    def _say(self, message: str) -> None:
        """Print a line above the progress bar (rank 0 only)."""
        if self.ctx.is_main:
            tqdm.write(message)

    def _log(self, row: dict[str, Any]) -> None:
        """Append a row to log.jsonl (rank 0 only)."""
        if self.log is not None:
            self.log.write(row)

    # ------------------------------------------------------------------ resume
    def _resolve_resume(self) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
        cfg, existing = self.cfg, list_checkpoints(self.save_dir)
        if cfg.resume is None:
            if existing and not cfg.overwrite:
                raise ConfigError(
                    f"config key 'save_path': {self.save_dir} already holds checkpoints "
                    f"({', '.join(p.name for p in existing[:3])}); use --resume auto to continue that run, "
                    f"--overwrite true to start over there, or another --save_path")
            return None, None
        if cfg.resume == "auto":
            path = latest_checkpoint(self.save_dir)
            if path is None:
                if existing and not cfg.overwrite:
                    raise ConfigError(f"config key 'resume': no readable checkpoint in {self.save_dir} "
                                      f"(all of {[p.name for p in existing]} are corrupt)")
                self._say(f"resume auto: no checkpoint in {self.save_dir}, starting a fresh run")
                return None, None
        else:
            path = Path(cfg.resume)
        return load_checkpoint(path), path

    def _class_weights(self, state: Optional[dict[str, Any]]) -> Optional[torch.Tensor]:
        """``loss: ce_median_freq``: the checkpoint's class weights when resuming, else median-frequency weights
        of the training labels (:func:`pspnet.loss.median_frequency_weights`); None for ``ce``."""
        if self.cfg.loss != "ce_median_freq":
            return None
        if state is not None and state.get("class_weights") is not None:
            return torch.tensor(state["class_weights"], dtype=torch.float32)
        base, indices = base_dataset(self.train_set)
        return median_frequency_weights((base.label(i) for i in indices), self.cfg.classes, self.cfg.ignore_label,
                                        self.cfg.class_weight_power)

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        for key in ("state_dict", "optimizer", "iteration"):
            if key not in state:
                raise CheckpointError(f"{path} has no '{key}': not a pspnet.train checkpoint, cannot resume")
        try:
            load_state_dict(self.model, state["state_dict"])
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {path} does not fit the model of this config "
                               f"(layers/classes/bins changed?): {e}") from e
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        saved_ipe = state.get("iters_per_epoch")
        if saved_ipe is not None and saved_ipe != self.iters_per_epoch:
            warnings.warn(f"{path} was trained with {saved_ipe} iterations per epoch, now "
                          f"{self.iters_per_epoch} (batch_size or dataset changed): epochs are counted anew "
                          f"from iteration {self.iteration}", stacklevel=2)
        self.best = dict(state.get("best") or {})
        self.last_metrics = state.get("metrics")
        saved_cfg, free = state.get("config") or {}, resume_free_keys()
        changed = {k: (saved_cfg[k], v) for k, v in self.cfg.to_dict().items()
                   if k in saved_cfg and saved_cfg[k] != v and k not in free}
        if changed:
            warnings.warn(f"resuming {path} with changed config keys (saved, now): {changed}", stacklevel=2)
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.ctx.world_size:
            set_rng_state(per_rank[self.ctx.rank])
        elif "rng" in state:
            if per_rank or self.ctx.distributed:
                warnings.warn(f"{path} holds RNG states of {max(len(per_rank), 1)} processes, this run has "
                              f"{self.ctx.world_size}: every process restarts from rank 0's state", stacklevel=2)
            set_rng_state(state["rng"])
        restore_lr_scheduler(self.lr_scheduler, state.get("lr_scheduler"), self.iteration)
        self._say(f"resumed from {path} at iteration {self.iteration}/{self.max_iter}")

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str, rng: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Atomically write checkpoint ``save_path/name`` (rank 0; every process must call it, as it gathers
        their RNG states); epoch checkpoints are then pruned to ``keep_last``. ``rng`` overrides this
        process's RNG state stored (default: the current one). Returns the path (None on other ranks)."""
        rngs = self.ctx.all_gather_object(rng if rng is not None else get_rng_state())
        if not self.ctx.is_main:
            return None
        state = {
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.iteration // self.iters_per_epoch,
            "iteration": self.iteration,
            "iters_per_epoch": self.iters_per_epoch,
            "max_iter": self.max_iter,
            "config": self.cfg.to_dict(),
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "world_size": self.ctx.world_size,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "amp": self.amp,                            # what config amp resolved to for this run
            "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
            "best": dict(self.best),
            "metrics": self.last_metrics,
            **self._class_info,
        }
        path = save_checkpoint(self.save_dir / name, state)
        if name != FINAL_NAME:
            prune(self.save_dir, self.cfg.keep_last)
        return path

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any]:
        """Single-scale validation on the ``val`` split (first ``max_val_samples``); logs, prints the
        per-class table and tracks the best mIoU. Returns the metrics dict."""
        cfg = self.cfg
        if self.val_set is None:
            self.val_set = build_eval_set(cfg, "val", cfg.max_val_samples)
        self.ctx.broadcast_buffers(self.model)  # every shard is predicted by the model rank 0 saves
        t0 = time.perf_counter()
        metrics = evaluate_dataset(self.model, self.val_set, cfg, scales=[1.0], flip=False, desc="val",
                                   progress=self.progress, ctx=self.ctx, amp=self.amp)
        result = metrics.compute()
        epoch = round(self.iteration / self.iters_per_epoch, 4)
        self._log({"type": "val", "iter": self.iteration, "epoch": epoch, "miou": result["miou"],
                        "macc": result["macc"], "allacc": result["allacc"], "iou": result["iou"],
                        "acc": result["acc"], "images": result["num_images"],
                        "eval_s": round(time.perf_counter() - t0, 3), "elapsed_s": round(self.elapsed(), 3)})
        base, _ = base_dataset(self.val_set)
        self._last_table = metrics.table(getattr(base, "classes", None))
        self._say(f"val @ iter {self.iteration} (epoch {epoch}): {metrics.summary()}\n{self._last_table}")
        if result["miou"] > self.best.get("miou", -1.0):
            self.best = {"miou": result["miou"], "macc": result["macc"], "allacc": result["allacc"],
                         "iter": self.iteration, "epoch": epoch}
        self.last_metrics = result
        return result

    # ------------------------------------------------------------------ training
    def elapsed(self) -> float:
        """Seconds since this Trainer was built."""
        return time.perf_counter() - self.start_time

    def _log_train(self, window: _Window, lr: float) -> None:
        n = max(window.n, 1)
        row = {"type": "train", "iter": self.iteration, "epoch": round(self.iteration / self.iters_per_epoch, 4),
               "loss": window.loss / n, "main_loss": window.main / n, "aux_loss": window.aux / n, "lr": lr,
               "images_per_s": round(window.images_per_s(), 3), "elapsed_s": round(self.elapsed(), 3)}
        self._log(row)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[float, float, float]:
        """One SGD step on this process's share of a global batch; returns the (loss, main, aux) means over
        the processes.

        Raises:
            FloatingPointError: the loss is NaN/inf on any process (checked before backward, on all of them).
        """
        ctx = self.ctx
        images = images.to(ctx.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, self.amp):
            _, main_loss, aux_loss = self.net(images, labels)
            loss = self.criterion.combine(main_loss, aux_loss)
        means = ctx.all_reduce_sum(torch.stack(loss).detach().float()) / ctx.world_size
        values = tuple(means.tolist())
        if not all(map(math.isfinite, values)):
            raise FloatingPointError(f"loss is {values[0]} at iteration {self.iteration + 1} "
                                     f"(lr {lr:.3g}); try a lower --base_lr")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.total.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return values

    def _advance_lr(self) -> float:
        """Step the LR scheduler once (after every iteration, as semseg sets the poly LR); returns the first
        (backbone) group's new lr. An fp16 GradScaler skips the optimizer step of an iteration with inf / NaN
        gradients while the schedule still advances, which PyTorch's order check would report as
        ``lr_scheduler.step()`` before ``optimizer.step()``: that warning is silenced then."""
        with warnings.catch_warnings():
            if self.scaler is not None:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_scheduler.step()
        return self.lr_scheduler.get_last_lr()[0]

    def _train_epoch(self, epoch: int, skip: int) -> None:
        cfg = self.cfg
        n_epochs = math.ceil(self.max_iter / self.iters_per_epoch)
        remaining = min(self.iters_per_epoch, self.max_iter - epoch * self.iters_per_epoch)
        bar = tqdm(total=remaining, initial=skip, desc=f"epoch {epoch + 1}/{n_epochs}", unit="it",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        window, epoch_loss, epoch_n = _Window(), 0.0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        for images, labels in self.loader:
            values = self._step(images, labels, lr)
            self.iteration += 1
            lr = self._advance_lr()
            window.add(*values, images=images.shape[0] * self.ctx.world_size)
            epoch_loss, epoch_n = epoch_loss + values[0], epoch_n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.3f}", lr=f"{lr:.2e}", img_s=f"{window.images_per_s():.2f}")
            if self.iteration % cfg.log_freq == 0 or self.iteration >= self.max_iter:
                self._log_train(window, lr)
                window.reset()
            if self.iteration >= self.max_iter:
                break
        bar.close()
        if epoch_n:
            self._say(f"epoch {epoch + 1}/{n_epochs} iter {self.iteration}/{self.max_iter} "
                       f"loss {epoch_loss / epoch_n:.4f} lr {lr:.3e} elapsed {self.elapsed():.0f}s")

    def run(self) -> Path:
        """Train up to ``max_iter`` iterations, then save ``final.pth``, validate and write
        ``final_metrics.{json,md}`` in ``save_path``.

        Returns:
            the path of ``final.pth``.
        Raises:
            FloatingPointError: the loss became NaN/inf (nothing is saved for that iteration).
        """
        cfg = self.cfg
        self._log({"type": "start", "iter": self.iteration, "max_iter": self.max_iter,
                        "iters_per_epoch": self.iters_per_epoch, "train_images": len(self.train_set),
                        "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "torch_threads": torch.get_num_threads(), "world_size": self.ctx.world_size,
                        "device": str(self.ctx.device), "amp": self.amp, "amp_reason": self.amp_reason,
                        "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
                        "classes": list(getattr(base_dataset(self.train_set)[0], "classes", [])),
                        "config": cfg.to_dict()})
        procs = f"{self.ctx.world_size} processes x " if self.ctx.distributed else ""
        self._say(f"precision: {self.amp} ({self.amp_reason})")
        self._say(f"training PSPNet-{cfg.layers} (fused={cfg.fused}, amp={self.amp}) on {len(self.train_set)} images: "
                  f"{self.iters_per_epoch} iterations/epoch, iterations {self.iteration + 1}..{self.max_iter}, "
                  f"batch {cfg.batch_size} ({procs}{self.ctx.device}, {torch.get_num_threads()} threads) "
                  f"-> {self.save_dir}")
        if self.iteration >= self.max_iter:
            self._say(f"nothing to train: already at iteration {self.iteration} of {self.max_iter}")
        while self.iteration < self.max_iter:
            epoch = self.iteration // self.iters_per_epoch
            skip = self.iteration - epoch * self.iters_per_epoch
            self.sampler.set_epoch(epoch, skip * cfg.batch_size)
            self._train_epoch(epoch, skip)
            done = self.iteration // self.iters_per_epoch
            if self.iteration % self.iters_per_epoch == 0 and self.iteration < self.max_iter:
                if done % cfg.save_freq == 0:
                    path = self.save(epoch_checkpoint_name(done))
                    self._say(f"saved {path}")
                if cfg.eval_freq and done % cfg.eval_freq == 0:
                    self.validate()
        rng = get_rng_state()
        final = self.save(FINAL_NAME, rng)
        result = self.validate()
        self.save(FINAL_NAME, rng)  # again, now holding the final metrics
        final = self.save_dir / FINAL_NAME
        if self.ctx.is_main:
            write_report(self.save_dir, "final_metrics", result, self._last_table,
                         {"checkpoint": str(final), "iteration": self.iteration, "split": "val",
                          "scales": [1.0], "flip": False, "world_size": self.ctx.world_size})
            print(f"final checkpoint: {final}")
        self.ctx.barrier()  # no process leaves before rank 0 has written everything
        return final
