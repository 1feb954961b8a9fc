"""One cache for the small constant tables the kernels read (bin windows, interpolation weights).

Built once per key (which names the device, dtype and sizes): the Triton launchers' lookup tables and the
concat-free head's interpolation matrices then cost no construction or host-to-device copy after the
first call, so a CUDA-graph capture after a warm-up call copies nothing.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_TABLES: dict = {}


def cached_table(key: tuple, make: Callable[[], T]) -> T:
    """``make()`` once per ``key``, then the same object. While ``torch.compile`` or ``torch.export`` traces, nothing
    is cached or looked up: ``make()`` is traced into the graph (built from the runtime shape where the sizes are
    symbolic), and the tracer's fake tensors never reach the cache that eager calls read."""
    if torch.compiler.is_compiling():
        return make()
    hit = _TABLES.get(key)
    if hit is None:
        hit = _TABLES[key] = make()
    return hit
