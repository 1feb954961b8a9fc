"""Backend selection for the fused PPM ops: ``auto`` (default), ``triton``, ``cpp``, ``reference``.

``auto`` picks Triton for CUDA tensors and the compiled C++ extension for CPU tensors, falling back to
the pure-PyTorch reference when those are unavailable (the extension loader warns once). An explicit
choice is honoured or rejected with a clear error: ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests), ``cpp`` needs CPU tensors.

Usage::

    psp_kernels.set_backend("reference")          # process-wide
    with psp_kernels.use_backend("cpp"): ...      # scoped
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
_state = {"backend": os.environ.get("PSP_KERNELS_BACKEND", "auto")}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend (one of ``BACKENDS``). Raises ValueError for an unknown name."""
    _state["backend"] = _check_name(name)


def get_backend() -> str:
    """The process-wide backend name currently in force."""
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that sets the backend for its body and restores the previous one after."""
    previous = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton() -> ModuleType:
    from . import triton as triton_backend  # imported lazily: triton is optional on CPU machines
    return triton_backend


def _reference() -> ModuleType:
    from . import reference
    return reference


def resolve(device: torch.device, name: str | None = None) -> ModuleType:
    """Return the backend module for tensors on ``device``.

    The module provides ``pool_forward``, ``pool_backward``, ``project_forward``, ``project_backward``,
    ``upsample_forward`` and ``upsample_backward`` (see ``psp_kernels.reference``).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the requested backend cannot run on ``device`` (e.g. ``cpp`` for CUDA tensors,
            ``triton`` for CPU tensors without ``TRITON_INTERPRET=1``, ``cpp`` with no built extension).
    """
    name = _check_name(name or _state["backend"])
    if name == "reference":
        return _reference()
    if name == "triton":
        if device.type != "cuda" and not _triton_interpreter():
            raise RuntimeError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        return _triton()
    from ._extension import load_extension
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' needs CPU tensors, got {device}")
        ext = load_extension()
        if ext is None:
            raise RuntimeError("backend 'cpp' requested but the C++ extension could not be built or loaded")
        return ext
    # auto
    if device.type == "cuda":
        return _triton()
    if device.type == "cpu":
        return load_extension() or _reference()
    return _reference()
