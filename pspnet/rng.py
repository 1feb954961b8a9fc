"""Seeding and the random-number-generator state saved in checkpoints: python ``random`` (the OpenCV
transforms draw from it, as semseg's), numpy and torch (CPU, and the current CUDA device's when CUDA is
in use)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["set_seed", "get_rng_state", "set_rng_state"]


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
