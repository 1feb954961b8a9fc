"""Process settings that the command-line tools apply before their first tensor: torch's thread count and
how the C allocator treats large blocks."""

from __future__ import annotations

import ctypes
import platform

import torch

from .config import TrainConfig

__all__ = ["configure_process", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse.

    By default glibc maps each block above its mmap threshold (at most 32 MiB) afresh and unmaps it when freed,
    so every large activation of every iteration page-faults its memory in again: on a 2-core VM that is most
    of the time of memory-bound ops (a 59 MB pyramid-pooling concat buffer: 17 ms with fresh pages, 4 ms
    reused). ``mallopt(M_MMAP_MAX, 0)`` and a maximal ``M_TRIM_THRESHOLD`` keep the process's peak memory
    mapped instead (it is not returned to the system until exit), as jemalloc / tcmalloc do by default.

    Returns:
        True when applied; False where the C library is not glibc (nothing changed).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def configure_process(cfg: TrainConfig) -> None:
    """The config's process settings: ``threads`` (``torch.set_num_threads``) and, when ``keep_freed_memory``,
    :func:`keep_freed_memory`. Called by ``pspnet.train``, ``pspnet.evaluate`` and ``pspnet.predict``."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.keep_freed_memory:
        keep_freed_memory()
