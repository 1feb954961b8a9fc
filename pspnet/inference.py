"""Sliding-window, multi-scale, flip inference with the semantics of hszhao/semseg ``tool/test.py``
(``net_process``, ``scale_process`` and the scale loop of ``test``), batched for speed.

For each scale s: the image (float32 RGB, 0-255) is resized so its long side is ``round(s * base_size)``
(``cv2.INTER_LINEAR``, aspect kept); padded (centred) to at least the crop with the mean colour;
covered by windows of the crop size with stride ``ceil(crop * 2/3)`` on a grid of
``ceil((size - crop) / stride) + 1`` positions per axis, the last one snapped to the border. Softmax
probabilities of the windows (optionally averaged with the horizontally flipped pass) are summed and
divided by the per-pixel window count, the padding is cut off and the probabilities are resized
bilinearly to the original image size. Probabilities are averaged over scales; the label is the argmax.

Differences from semseg, none of which change the result beyond float rounding: all windows of a
scale (and their flips) go through the network in batches of ``window_batch``; the mean padding is
applied after normalisation as zeros (``(mean - mean) / std == 0``); accumulation is float32 in torch
(semseg: float64 numpy); the final probability resize uses ``F.interpolate(bilinear,
align_corners=False)``, which is the same half-pixel bilinear rule as ``cv2.INTER_LINEAR``. semseg
always flips; here ``flip`` is a parameter.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["window_starts", "scaled_size", "predict_probs", "predict"]


def window_starts(size: int, crop: int, stride_rate: float = 2.0 / 3.0) -> list[int]:
    """Start offsets of the sliding windows along one axis (semseg ``scale_process``).

    Args:
        size: padded image extent (>= crop), pixels.
        crop: window extent, pixels.
        stride_rate: stride as a fraction of the crop (semseg: 2/3).
    Returns:
        the ``ceil((size - crop) / stride) + 1`` start offsets, ``stride = ceil(crop * stride_rate)``,
        the last window snapped so that it ends at ``size``.
    Raises:
        ValueError: ``size < crop`` or ``crop < 1``.
    """
    if crop < 1 or size < crop:
        raise ValueError(f"window_starts needs 1 <= crop <= size, got crop={crop}, size={size}")
    stride = int(math.ceil(crop * stride_rate))
    grid = int(math.ceil((size - crop) / stride)) + 1
    return [min(i * stride + crop, size) - crop for i in range(grid)]


def scaled_size(height: int, width: int, long_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the long side equal to ``long_size`` and the aspect kept, rounded as semseg
    does (Python ``round``)."""
    if height > width:
        return long_size, int(round(long_size / float(height) * width))
    return int(round(long_size / float(width) * height)), long_size


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_windows(model: nn.Module, windows: torch.Tensor, flip: bool, window_batch: int) -> torch.Tensor:
    """Softmax probabilities [n, K, h, w] of n windows [n, 3, h, w] (semseg ``net_process``).

    With ``flip`` each window is also run mirrored and the two probability maps are averaged.
    Logits at another resolution than the input are upsampled bilinearly with ``align_corners=True``.
    """
    n, _, h, w = windows.shape
    batch = torch.cat([windows, windows.flip(3)], 0) if flip else windows
    chunks = []
    for start in range(0, batch.shape[0], window_batch):
        logits = model(batch[start:start + window_batch])
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, (h, w), mode="bilinear", align_corners=True)
        chunks.append(F.softmax(logits.float(), dim=1))
    probs = torch.cat(chunks, 0)
    if flip:
        probs = (probs[:n] + probs[n:].flip(3)) / 2
    return probs


def _scale_probs(model: nn.Module, image: np.ndarray, classes: int, crop_h: int, crop_w: int,
                 mean: torch.Tensor, std: torch.Tensor, flip: bool, window_batch: int,
                 device: torch.device) -> torch.Tensor:
    """Window-averaged probabilities [K, h, w] of one resized float32 image [h, w, 3] (semseg
    ``scale_process`` up to, not including, the resize back to the original size)."""
    h, w = image.shape[:2]
    x = (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device) - mean) / std
    pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:  # zeros after normalisation == semseg's padding with the mean colour
        x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)
    new_h, new_w = x.shape[1:]
    boxes = [(y, xx) for y in window_starts(new_h, crop_h) for xx in window_starts(new_w, crop_w)]
    windows = torch.stack([x[:, y:y + crop_h, xx:xx + crop_w] for y, xx in boxes])
    probs = _forward_windows(model, windows, flip, window_batch)
    if probs.shape[1] != classes:
        raise ValueError(f"model returned {probs.shape[1]} channels, expected classes={classes}")
    total = torch.zeros(classes, new_h, new_w, device=device)
    count = torch.zeros(1, new_h, new_w, device=device)
    for (y, xx), p in zip(boxes, probs):
        total[:, y:y + crop_h, xx:xx + crop_w] += p
        count[:, y:y + crop_h, xx:xx + crop_w] += 1
    total /= count
    return total[:, top:top + h, left:left + w]


def predict_probs(model: nn.Module, image: np.ndarray, classes: int, base_size: int,
                  crop_size: tuple[int, int], scales: Sequence[float] = (1.0,), flip: bool = False,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  window_batch: int = 16) -> np.ndarray:
    """Class probabilities of one image by semseg's multi-scale sliding-window test.

    Args:
        model: network mapping normalised float32 [N, 3, h, w] to logits [N, K, h', w']; run in eval
            mode under ``torch.no_grad`` (its previous train/eval mode is restored).
        image: uint8 (or float, 0-255) RGB image [H, W, 3].
        classes: K.
        base_size: long side in pixels at scale 1.0.
        crop_size: (crop_h, crop_w) window size in pixels.
        scales: test scales (multiples of base_size).
        flip: also average with the horizontally flipped pass.
        mean, std: per-channel normalisation in 0-255 units; default ImageNet
            (``pspnet.data.transforms.IMAGENET_MEAN`` / ``IMAGENET_STD``).
        window_batch: max windows per forward pass (flipped copies count).
    Returns:
        float32 numpy array [K, H, W], probabilities averaged over windows, flips and scales.
    Raises:
        ValueError: bad image shape, empty scales, bad crop, or a model output with != K channels.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    if not scales:
        raise ValueError("scales must not be empty")
    crop_h, crop_w = (int(c) for c in crop_size)
    if crop_h < 1 or crop_w < 1 or window_batch < 1:
        raise ValueError(f"crop_size and window_batch must be >= 1, got {crop_size}, {window_batch}")
    if mean is None or std is None:
        from pspnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    device = _model_device(model)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    image_f = np.asarray(image, dtype=np.float32)
    h, w = image_f.shape[:2]
    total = torch.zeros(classes, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: the psp:: custom ops reject inference tensors
            for scale in scales:
                new_h, new_w = scaled_size(h, w, round(scale * base_size))
                scaled = image_f if (new_h, new_w) == (h, w) else \
                    cv2.resize(image_f, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
                probs = _scale_probs(model, scaled, classes, crop_h, crop_w, mean_t, std_t, flip,
                                     window_batch, device)
                if probs.shape[1:] != (h, w):
                    probs = F.interpolate(probs[None], (h, w), mode="bilinear", align_corners=False)[0]
                total += probs
            total /= len(scales)
    finally:
        model.train(was_training)
    return total.cpu().numpy()


def predict(model: nn.Module, image: np.ndarray, classes: int, base_size: int,
            crop_size: tuple[int, int], scales: Sequence[float] = (1.0,), flip: bool = False,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            window_batch: int = 16) -> np.ndarray:
    """Label map int64 [H, W] = argmax over classes of :func:`predict_probs` (same arguments)."""
    probs = predict_probs(model, image, classes, base_size, crop_size, scales, flip, mean, std, window_batch)
    return probs.argmax(0).astype(np.int64)
