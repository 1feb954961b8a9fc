"""Mixed precision for training and inference: the config key ``amp`` (``auto``, ``none``, ``bf16``, ``fp16``).

``auto`` (the default) runs bf16 autocast where the device computes bf16 fast and fp32 elsewhere:

- CUDA: devices of compute capability 8.0 or newer (A100, H100, ...: bf16 tensor cores);
- CPU: processors with AMX tiles or AVX512-BF16 (oneDNN runs bf16 convolutions and GEMMs on them several
  times faster than fp32; on this project's 2-core Xeon the CamVid recipe trains about 3x faster);
- anything else: fp32 (bf16 autocast there is emulated and slower than fp32).

The choice is made once per run from torch's own capability queries (``torch.cuda.get_device_capability``,
``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``). Parameters, optimizer state and
BatchNorm statistics stay fp32 under every choice; fp16 adds a ``GradScaler``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["AMP_CHOICES", "AMP_DTYPES", "resolve_amp", "autocast", "grad_scaler"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)


def _cpu_bf16() -> Optional[str]:
    """The CPU feature that runs bf16 fast (``AMX`` or ``AVX512-BF16``), or None."""
    for name, query in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, query, lambda: False)():
            return name
    return None


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """The autocast mode to run config ``amp`` with on ``device``, and why (for the start-up line and the log).

    Args:
        amp: ``auto``, ``none``, ``bf16`` or ``fp16``.
        device: where the model runs.
    Returns:
        (``none`` | ``bf16`` | ``fp16``, a short reason such as ``"auto: CPU with AVX512-BF16"``).
    Raises:
        ValueError: an unknown ``amp``.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"config key 'amp': expected one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp != "auto":
        return amp, "set by the config"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        fast = major >= 8
        return ("bf16" if fast else "none"), (f"auto: CUDA sm_{major}{minor} "
                                               f"{'has' if fast else 'lacks'} bf16 tensor cores")
    if device.type == "cpu":
        feature = _cpu_bf16()
        if feature is not None:
            return "bf16", f"auto: CPU with {feature}"
        return "none", "auto: CPU without AMX or AVX512-BF16 (bf16 would be emulated)"
    return "none", f"auto: no fast bf16 known for device type {device.type!r}"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved ``amp`` (``none``, ``bf16``, ``fp16``) on ``device``; ``none`` gives a
    context that changes nothing."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """A ``GradScaler`` for fp16 (whose gradients underflow without loss scaling), else None (fp32 and bf16
    train unscaled)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
