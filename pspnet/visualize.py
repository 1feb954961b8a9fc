"""Colour-coded label maps and overlays, written as PNG (semseg ``util/util.py: colorize`` saves
palette PNGs; here RGB PNGs drawn with the dataset's ``classes.json`` colours)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np

from .checkpoint import atomic_write

__all__ = ["colorize", "overlay", "write_rgb_png"]

IGNORE_COLOR = (0, 0, 0)


def colorize(label: np.ndarray, palette: np.ndarray, ignore_color: Sequence[int] = IGNORE_COLOR) -> np.ndarray:
    """Map a label image to colours.

    Args:
        label: integer array [H, W] of class ids in [0, K); any other value (e.g. 255 void) is drawn
            with ``ignore_color``.
        palette: uint8 [K, 3] RGB colours.
        ignore_color: RGB colour for values outside the palette.
    Returns:
        uint8 RGB image [H, W, 3].
    Raises:
        ValueError: label not 2-D, or palette not [K, 3].
    """
    label = np.asarray(label)
    palette = np.asarray(palette, dtype=np.uint8)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be [K, 3], got shape {palette.shape}")
    out = np.empty(label.shape + (3,), dtype=np.uint8)
    out[:] = np.asarray(ignore_color, dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid].astype(np.int64)]
    return out


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``alpha * color + (1 - alpha) * image`` (uint8 RGB [H, W, 3] each, same size).

    Raises:
        ValueError: shapes differ or alpha outside [0, 1].
    """
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and color {color.shape} must have the same shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return cv2.addWeighted(np.ascontiguousarray(color, dtype=np.uint8), alpha,
                           np.ascontiguousarray(image, dtype=np.uint8), 1.0 - alpha, 0.0)


def write_rgb_png(path: Union[str, os.PathLike], rgb: np.ndarray) -> Path:
    """Encode an RGB uint8 image [H, W, 3] (or gray [H, W]) as PNG and write it atomically.

    Raises:
        ValueError: OpenCV cannot encode the array.
    """
    arr = np.ascontiguousarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"cannot encode PNG for {path} (array {arr.shape}, {arr.dtype})")
    return atomic_write(path, lambda f: f.write(buf.tobytes()))
