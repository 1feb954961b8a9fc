"""Argument checks of the public ops: bad input fails here, naming the argument, never inside a kernel."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: object, arg: str, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Check ``t`` is a non-empty floating tensor of rank ``dim`` (on ``device`` when given).

    Raises:
        TypeError: not a tensor, or not fp16/bf16/fp32/fp64.
        ValueError: wrong rank, or a zero-sized dimension.
        RuntimeError: on another device than ``device``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{arg} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{arg} must not be empty, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise RuntimeError(f"{arg} is on {t.device} but the input is on {device}: move them to one device")
    return t


def check_tensor_list(ts: Sequence[torch.Tensor], arg: str, count: int, shape: tuple[int, ...],
                      device: torch.device) -> list[torch.Tensor]:
    """Check ``ts`` holds ``count`` floating tensors of ``shape`` on ``device`` (one per bin)."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{arg} must be a list of tensors (one per bin), got {type(ts).__name__}")
    if len(ts) != count:
        raise ValueError(f"{arg} must hold one tensor per bin ({count}), got {len(ts)}")
    for k, t in enumerate(ts):
        check_tensor(t, f"{arg}[{k}]", len(shape), device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{arg}[{k}] must have shape {shape}, got {tuple(t.shape)}")
    return list(ts)


def layout_for_kernels(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is NCHW-contiguous or channels_last (the layouts kernels read), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()
