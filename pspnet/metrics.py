"""Segmentation metrics exactly as hszhao/semseg ``util/util.py`` (``intersectionAndUnion``) and
``tool/test.py`` (``cal_acc``): areas are accumulated over the whole dataset, then per class

    IoU = sum(I) / (sum(U) + 1e-10),   acc = sum(I) / (sum(T) + 1e-10),
    mIoU = mean(IoU),  mAcc = mean(acc),  allAcc = sum(I) / (sum(T) + 1e-10)

(classes absent from both prediction and target count as IoU 0, as in semseg).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["intersection_and_union", "SegmentationMetrics"]

ArrayLike = Union[np.ndarray, torch.Tensor]
EPS = 1e-10


def _check_values(name: str, values: ArrayLike, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError if ``values`` holds anything outside [0, K) other than ignore_index."""
    bad = (values < 0) | ((values >= num_classes) & (values != ignore_index))
    if bool(bad.any()):
        first = values[bad].reshape(-1)[0]
        raise ValueError(f"{name} contains value {int(first)} outside [0, {num_classes}) "
                         f"and not ignore_index={ignore_index}")


def intersection_and_union(pred: ArrayLike, target: ArrayLike, num_classes: int,
                           ignore_index: int = 255) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Per-class pixel areas of intersection, union and target of one prediction (semseg
    ``util/util.py: intersectionAndUnion`` / ``intersectionAndUnionGPU``).

    Pixels whose target is ``ignore_index`` are dropped from all three areas (semseg sets
    ``pred[target == ignore] = ignore`` first). Counting uses bincount over [0, K) instead of
    ``np.histogram`` / ``torch.histc`` (same result for valid inputs, exact integers).

    Args:
        pred: predicted class ids, any shape (1-3 dims in semseg), integer dtype; numpy or torch.
        target: ground-truth ids, same shape, values in [0, K) or ``ignore_index``.
        num_classes: K.
        ignore_index: label value to ignore (255).
    Returns:
        ``(area_intersection, area_union, area_target)``, each int64 of shape [K]: numpy arrays for
        numpy input, torch tensors on the input's device for torch input.
    Raises:
        ValueError: shapes differ, non-integer dtype, or a value outside [0, K) that is not ignore_index.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    numpy_in = not (isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor))
    pred_t = torch.as_tensor(np.asarray(pred) if numpy_in else pred)
    target_t = torch.as_tensor(np.asarray(target) if numpy_in else target, device=pred_t.device)
    for name, t in (("pred", pred_t), ("target", target_t)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    pred_t, target_t = pred_t.reshape(-1).long(), target_t.reshape(-1).long()
    _check_values("pred", pred_t, num_classes, ignore_index)
    _check_values("target", target_t, num_classes, ignore_index)
    valid = target_t != ignore_index
    pred_v, target_v = pred_t[valid], target_t[valid]
    pred_v = pred_v[pred_v != ignore_index]
    inter = target_t[valid & (pred_t == target_t)]
    area_i = torch.bincount(inter, minlength=num_classes)
    area_o = torch.bincount(pred_v, minlength=num_classes)
    area_t = torch.bincount(target_v, minlength=num_classes)
    areas = (area_i, area_o + area_t - area_i, area_t)
    return tuple(a.numpy() for a in areas) if numpy_in else areas


class SegmentationMetrics:
    """Accumulates intersection / union / target areas over a dataset (semseg ``AverageMeter`` sums
    in ``tool/train.py: validate`` and ``tool/test.py: cal_acc``).

    Args:
        num_classes: K.
        ignore_index: label value excluded from every area (255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Zero the accumulated areas."""
        self.intersection = np.zeros(self.num_classes, dtype=np.int64)
        self.union = np.zeros(self.num_classes, dtype=np.int64)
        self.target = np.zeros(self.num_classes, dtype=np.int64)
        self.count = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add one prediction (or a batch: any matching shapes) to the totals.

        Returns:
            This update's ``(area_intersection, area_union, area_target)`` as int64 numpy arrays [K].
        Raises:
            ValueError: see :func:`intersection_and_union`.
        """
        areas = intersection_and_union(pred, target, self.num_classes, self.ignore_index)
        i, u, t = (a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in areas)
        self.intersection += i
        self.union += u
        self.target += t
        self.count += 1
        return i, u, t

    def reduce(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the totals (areas and image count) by ``sum_fn`` of them, e.g. their sum over the
        processes of a distributed evaluation (``DistContext.all_reduce_sum``), as semseg all-reduces its
        ``intersectionAndUnionGPU`` areas.

        Args:
            sum_fn: takes an int64 CPU tensor [3K + 1] and returns the reduced tensor of the same shape.
        """
        k = self.num_classes
        packed = torch.from_numpy(np.concatenate([self.intersection, self.union, self.target, [self.count]]))
        total = sum_fn(packed).numpy()
        self.intersection, self.union, self.target = (total[i * k:(i + 1) * k].copy() for i in range(3))
        self.count = int(total[3 * k])

    def compute(self) -> dict[str, Any]:
        """Metrics over everything accumulated so far.

        Returns:
            dict with ``iou`` and ``acc`` (per-class lists of float, length K), ``miou``, ``macc``,
            ``allacc`` (floats in [0, 1]), the summed areas ``area_intersection``, ``area_union``,
            ``area_target`` (lists of int) and ``num_images`` (number of updates).
        """
        iou = self.intersection / (self.union + EPS)
        acc = self.intersection / (self.target + EPS)
        allacc = float(self.intersection.sum() / (self.target.sum() + EPS))
        return {
            "miou": float(np.mean(iou)),
            "macc": float(np.mean(acc)),
            "allacc": allacc,
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
            "area_intersection": self.intersection.tolist(),
            "area_union": self.union.tolist(),
            "area_target": self.target.tolist(),
            "num_images": self.count,
        }

    def summary(self) -> str:
        """One line ``mIoU/mAcc/allAcc a/b/c`` (semseg's log format)."""
        m = self.compute()
        return f"mIoU/mAcc/allAcc {m['miou']:.4f}/{m['macc']:.4f}/{m['allacc']:.4f}"

    def table(self, class_names: Optional[Sequence[str]] = None) -> str:
        """Per-class IoU / accuracy as a markdown table (also readable as plain text).

        Args:
            class_names: K names; defaults to ``class_0 .. class_{K-1}``.
        Raises:
            ValueError: wrong number of names.
        """
        names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} entries, expected {self.num_classes}")
        m = self.compute()
        width = max([len("mean"), len("class")] + [len(n) for n in names])
        rows = [f"| {'id':>3} | {'class':<{width}} | {'IoU':>6} | {'Acc':>6} |",
                f"|{'-' * 4}:|:{'-' * (width + 1)}|{'-' * 7}:|{'-' * 7}:|"]
        for k, name in enumerate(names):
            rows.append(f"| {k:>3} | {name:<{width}} | {m['iou'][k]:.4f} | {m['acc'][k]:.4f} |")
        rows.append(f"| {'':>3} | {'mean':<{width}} | {m['miou']:.4f} | {m['macc']:.4f} |")
        rows.append(f"\nallAcc {m['allacc']:.4f} over {m['num_images']} images")
        return "\n".join(rows)
