"""Paired image/label augmentations for semantic segmentation.

Semantics follow hszhao/semseg ``util/transform.py`` (the PSPNet reference
implementation; paper Sec. 4 "random resize, random rotation, Gaussian blur,
random mirror"):

* every transform is a callable ``t(image, label) -> (image, label)``;
* before :class:`ToTensor`, ``image`` is a NumPy array ``H x W x 3`` (RGB,
  float32 in 0..255 as produced by :class:`pspnet.data.CamVid`) and ``label``
  is an integer NumPy array ``H x W`` (class ids, ``ignore_label`` = void);
* geometry uses OpenCV: images are interpolated bilinearly
  (``INTER_LINEAR``), labels with nearest neighbour (``INTER_NEAREST``) so no
  new class ids are invented;
* randomness comes from Python's :mod:`random` module, as in semseg, so
  ``random.seed(s)`` makes a pipeline reproducible in the main process.  In
  DataLoader workers, pass ``worker_init_fn=seed_worker`` (see
  :func:`seed_worker`) so each worker's :mod:`random` state is derived from
  torch's per-worker seed (and therefore from ``torch.manual_seed``).

Labels that are not ``uint8`` are converted to ``int32`` (OpenCV cannot
resample ``int64``); :class:`ToTensor` finally returns ``torch.int64``.
"""

from __future__ import annotations

import numbers
import random
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "RandScale",
    "RandRotate",
    "RandomGaussianBlur",
    "RandomHorizontalFlip",
    "Crop",
    "Resize",
    "ToTensor",
    "Normalize",
    "seed_worker",
    "train_transform",
    "val_transform",
]

#: ImageNet RGB mean on the 0..255 scale (semseg ``tool/train.py``).
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
#: ImageNet RGB standard deviation on the 0..255 scale (semseg ``tool/train.py``).
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


# --------------------------------------------------------------------------
# argument validation helpers (each raises ValueError naming the argument)
# --------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_range(name: str, value, positive: bool) -> tuple[float, float]:
    """Validate a ``(low, high)`` pair of finite numbers with ``low < high``."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(_is_number(v) for v in value)
        or not value[0] < value[1]
        or (positive and value[0] <= 0)
    ):
        kind = "positive " if positive else ""
        raise ValueError(f"{name} must be 2 increasing {kind}numbers (low, high), got {value!r}")
    return float(value[0]), float(value[1])


def _check_prob(name: str, value) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_size(name: str, value) -> tuple[int, int]:
    """Validate ``(h, w)`` positive ints; a single int means a square size."""
    if _is_int(value):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(_is_int(v) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or 2 positive ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def _check_triple(name: str, value, positive: bool = False) -> list[float]:
    """Validate 3 finite numbers (one per RGB channel)."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or not all(_is_number(v) for v in value)
        or (positive and not all(v > 0 for v in value))
    ):
        kind = "positive " if positive else ""
        raise ValueError(f"{name} must be 3 {kind}numbers (one per RGB channel), got {value!r}")
    return [float(v) for v in value]


def _check_ignore_label(value) -> int:
    if not _is_int(value):
        raise ValueError(f"ignore_label must be an int, got {value!r}")
    return int(value)


def _check_pair(image, label) -> tuple[np.ndarray, np.ndarray]:
    """Validate an ``(image H x W x 3, label H x W)`` NumPy pair.

    Returns the pair, with a non-``uint8`` integer label converted to
    ``int32`` (a dtype every OpenCV call used here supports).

    Raises:
        ValueError: if the image is not an ``H x W x 3`` array, the label is
            not an integer ``H x W`` array, or their sizes differ.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be a NumPy array of shape H x W x 3 (RGB), got {shape}")
    if not isinstance(label, np.ndarray) or label.ndim != 2:
        shape = getattr(label, "shape", type(label).__name__)
        raise ValueError(f"label must be a NumPy array of shape H x W, got {shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must have an integer dtype, got {label.dtype}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"label shape {label.shape} must equal the image size {image.shape[:2]} (H, W)"
        )
    if label.dtype != np.uint8 and label.dtype != np.int32:
        label = label.astype(np.int32)
    return image, label


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
class Compose:
    """Apply paired transforms in order: ``t_n(...t_1(image, label))``.

    Args:
        transforms: sequence of callables ``(image, label) -> (image, label)``.

    Raises:
        ValueError: if ``transforms`` is not a sequence of callables.
    """

    def __init__(self, transforms: Sequence[Callable]):
        if not isinstance(transforms, Sequence) or not all(callable(t) for t in transforms):
            raise ValueError(f"transforms must be a sequence of callables, got {transforms!r}")
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandScale:
    """Resize by one factor drawn uniformly from ``scale`` (no aspect jitter).

    semseg ``RandScale``: ``f = low + (high - low) * random.random()``, then
    ``cv2.resize(..., fx=f, fy=f)`` with ``INTER_LINEAR`` for the image and
    ``INTER_NEAREST`` for the label; output size is ``round(H*f) x round(W*f)``.

    Args:
        scale: ``(low, high)`` with ``0 < low < high`` (default 0.5..2.0).

    Raises:
        ValueError: bad ``scale``; bad image/label on call.
    """

    def __init__(self, scale=(0.5, 2.0)):
        self.scale = _check_range("scale", scale, positive=True)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        low, high = self.scale
        f = low + (high - low) * random.random()
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
        return image, label

    def __repr__(self) -> str:
        return f"RandScale(scale={self.scale})"


class RandRotate:
    """With probability ``p``, rotate by an angle drawn uniformly from ``rotate``.

    semseg ``RandRotate``: angle in degrees (counter-clockwise, OpenCV
    convention) about the centre ``(W/2, H/2)`` via
    ``cv2.getRotationMatrix2D((w/2, h/2), angle, 1)``; output keeps the input
    size.  Uncovered corners are filled with ``padding`` (image,
    ``INTER_LINEAR``) and ``ignore_label`` (label, ``INTER_NEAREST``).

    Args:
        rotate: ``(low, high)`` degrees, ``low < high`` (default -10..10).
        padding: 3 numbers, RGB fill on the image's 0..255 scale (default
            :data:`IMAGENET_MEAN`, which normalises to 0).
        ignore_label: label fill value (default 255).
        p: probability of rotating (default 0.5).

    Raises:
        ValueError: bad argument; bad image/label on call.
    """

    def __init__(self, rotate=(-10, 10), padding=IMAGENET_MEAN, ignore_label=255, p=0.5):
        self.rotate = _check_range("rotate", rotate, positive=False)
        self.padding = _check_triple("padding", padding)
        self.ignore_label = _check_ignore_label(ignore_label)
        self.p = _check_prob("p", p)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        if random.random() < self.p:
            low, high = self.rotate
            angle = low + (high - low) * random.random()
            h, w = label.shape
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
            image = cv2.warpAffine(
                image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT, borderValue=self.padding,
            )
            label = cv2.warpAffine(
                label, matrix, (w, h), flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label,
            )
        return image, label

    def __repr__(self) -> str:
        return f"RandRotate(rotate={self.rotate}, ignore_label={self.ignore_label}, p={self.p})"


class RandomGaussianBlur:
    """With probability ``p``, blur the image: ``cv2.GaussianBlur(img, (r, r), 0)``.

    semseg ``RandomGaussianBlur``; sigma is derived by OpenCV from the kernel
    size.  The label is unchanged.

    Args:
        radius: kernel size in pixels, a positive odd int (default 5).
        p: probability of blurring (default 0.5).

    Raises:
        ValueError: bad argument; bad image/label on call.
    """

    def __init__(self, radius=5, p=0.5):
        if not _is_int(radius) or radius <= 0 or radius % 2 == 0:
            raise ValueError(f"radius must be a positive odd int (kernel size), got {radius!r}")
        self.radius = int(radius)
        self.p = _check_prob("p", p)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        if random.random() < self.p:
            image = cv2.GaussianBlur(image, (self.radius, self.radius), 0)
        return image, label

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(radius={self.radius}, p={self.p})"


class RandomHorizontalFlip:
    """With probability ``p``, mirror image and label left-right together.

    semseg ``RandomHorizontalFlip`` (``cv2.flip(x, 1)``).

    Args:
        p: probability of flipping (default 0.5).

    Raises:
        ValueError: bad ``p``; bad image/label on call.
    """

    def __init__(self, p=0.5):
        self.p = _check_prob("p", p)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        if random.random() < self.p:
            image = cv2.flip(image, 1)
            label = cv2.flip(label, 1)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Crop:
    """Crop to ``size = (h, w)``, padding first if the input is smaller.

    semseg ``Crop``: if ``H < h`` or ``W < w``, pad symmetrically (the
    smaller half, ``pad // 2``, on top/left) with ``padding`` for the image
    and ``ignore_label`` for the label; then take an ``h x w`` window at a
    random offset (``crop_type="rand"``: ``random.randint`` for the row, then
    for the column) or centred (``"center"``: offset ``(H - h) // 2``).

    Args:
        size: ``(h, w)`` positive ints, or one int for a square crop.
        crop_type: ``"rand"`` or ``"center"``.
        padding: 3 numbers, RGB fill on the 0..255 scale (default
            :data:`IMAGENET_MEAN`).
        ignore_label: label fill value (default 255).

    Returns on call: image ``h x w x 3``, label ``h x w``.

    Raises:
        ValueError: bad argument; bad image/label on call.
    """

    def __init__(self, size, crop_type="rand", padding=IMAGENET_MEAN, ignore_label=255):
        self.size = _check_size("size", size)
        if crop_type not in ("rand", "center"):
            raise ValueError(f"crop_type must be 'rand' or 'center', got {crop_type!r}")
        self.crop_type = crop_type
        self.padding = _check_triple("padding", padding)
        self.ignore_label = _check_ignore_label(ignore_label)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        crop_h, crop_w = self.size
        h, w = label.shape
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if pad_h or pad_w:
            border = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
            image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=self.padding)
            label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=self.ignore_label)
            h, w = label.shape
        if self.crop_type == "rand":
            top = random.randint(0, h - crop_h)
            left = random.randint(0, w - crop_w)
        else:
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
        rows, cols = slice(top, top + crop_h), slice(left, left + crop_w)
        return image[rows, cols], label[rows, cols]

    def __repr__(self) -> str:
        return f"Crop(size={self.size}, crop_type={self.crop_type!r}, ignore_label={self.ignore_label})"


class Resize:
    """Resize to a fixed ``size = (h, w)`` (e.g. fixed-size validation).

    semseg ``Resize``: ``cv2.resize`` to ``(w, h)`` with ``INTER_LINEAR`` for
    the image and ``INTER_NEAREST`` for the label.  Aspect ratio is not kept.

    Args:
        size: ``(h, w)`` positive ints, or one int for a square.

    Raises:
        ValueError: bad ``size``; bad image/label on call.
    """

    def __init__(self, size):
        self.size = _check_size("size", size)

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        dsize = (self.size[1], self.size[0])  # OpenCV takes (width, height)
        image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST)
        return image, label

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class ToTensor:
    """NumPy pair -> torch pair.

    Image ``H x W x 3`` (any numeric dtype) -> contiguous ``torch.float32``
    ``[3, H, W]`` (values unchanged, still 0..255); label ``H x W`` ->
    ``torch.int64`` ``[H, W]``.  semseg ``ToTensor``.

    Raises:
        ValueError: bad image/label.
    """

    def __call__(self, image, label):
        image, label = _check_pair(image, label)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        return torch.from_numpy(chw), torch.from_numpy(label.astype(np.int64))

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``image = (image - mean[c]) / std[c]`` per channel, on tensors.

    Use after :class:`ToTensor`.  Image: ``torch.float32 [3, H, W]``; the
    label is returned unchanged.  Not in-place.  semseg ``Normalize``.

    Args:
        mean: 3 numbers, RGB, same scale as the image (default
            :data:`IMAGENET_MEAN`, 0..255 scale).
        std: 3 positive numbers (default :data:`IMAGENET_STD`).

    Raises:
        ValueError: bad ``mean``/``std``; image not a ``[3, H, W]`` float
            tensor on call.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = _check_triple("mean", mean)
        self.std = _check_triple("std", std, positive=True)

    def __call__(self, image, label):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
            raise ValueError(f"image must be a torch tensor of shape [3, H, W] (after ToTensor), got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")
        mean = torch.tensor(self.mean, dtype=image.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(3, 1, 1)
        return (image - mean) / std, label

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------
# pipelines and worker seeding
# --------------------------------------------------------------------------
def train_transform(
    crop_size,
    scale=(0.5, 2.0),
    rotate=(-10, 10),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    ignore_label=255,
) -> Compose:
    """semseg's training pipeline (``tool/train.py``), in semseg's order.

    ``RandScale(scale)`` -> ``RandRotate(rotate, padding=mean, p=0.5)`` ->
    ``RandomGaussianBlur()`` -> ``RandomHorizontalFlip()`` ->
    ``Crop(crop_size, "rand", padding=mean)`` -> ``ToTensor()`` ->
    ``Normalize(mean, std)``.

    Input: float32 RGB ``H x W x 3`` (0..255) and label ``H x W``.  Output:
    ``torch.float32 [3, h, w]`` and ``torch.int64 [h, w]`` with
    ``(h, w) = crop_size``.  Padding regions normalise to 0 in the image and
    carry ``ignore_label`` in the label.

    Raises:
        ValueError: any bad argument (named in the message).
    """
    crop_size = _check_size("crop_size", crop_size)
    return Compose([
        RandScale(scale),
        RandRotate(rotate, padding=mean, ignore_label=ignore_label),
        RandomGaussianBlur(),
        RandomHorizontalFlip(),
        Crop(crop_size, crop_type="rand", padding=mean, ignore_label=ignore_label),
        ToTensor(),
        Normalize(mean, std),
    ])


def val_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """Validation pipeline: ``ToTensor()`` then ``Normalize(mean, std)``.

    Sizes are untouched (the evaluator handles resizing / sliding windows,
    semseg ``tool/test.py``).  Output: ``torch.float32 [3, H, W]``,
    ``torch.int64 [H, W]``.

    Raises:
        ValueError: bad ``mean``/``std``.
    """
    return Compose([ToTensor(), Normalize(mean, std)])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed :mod:`random` and NumPy per worker.

    Uses ``torch.initial_seed()`` (which DataLoader sets to
    ``base_seed + worker_id``, with ``base_seed`` drawn from the torch
    generator, so it follows ``torch.manual_seed``) reduced mod 2**32.  The
    trainer must pass ``DataLoader(..., worker_init_fn=seed_worker)`` (and,
    for full reproducibility, a seeded ``generator=``) so that the
    :mod:`random`-based transforms differ between workers and are
    reproducible across runs.

    Args:
        worker_id: worker index (unused; the torch seed already includes it).
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
