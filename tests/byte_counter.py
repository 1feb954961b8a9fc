"""Bytes a Triton kernel moves, counted from its loads and stores in Triton's interpreter.

Within :func:`counting`, every masked load and store of an interpreted launch is attributed to the launch
argument (tensor) its addresses fall in. A launch's DRAM estimate counts, per tensor, every byte accessed for
the large tensors (activation-sized: a second read of them is a second trip to memory) and each distinct
byte once for the small ones (pooled maps, weights, tables, bin-resolution branches: they stay in cache),
which is the assumption of the PPM byte model (docs/ppm_byte_model.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Launch:
    """Bytes one launch of ``kernel`` read and wrote: per tensor (argument index) every byte accessed, and
    the distinct addresses."""
    kernel: str
    spans: list = field(default_factory=list)        # (start, end, argument index), sorted by start
    starts: np.ndarray = field(default=None)          # the spans' starts, for the address lookup
    accessed: dict = field(default_factory=dict)     # (index, "load" | "store") -> bytes accessed
    addresses: dict = field(default_factory=dict)    # (index, "load" | "store") -> list of address arrays

    def traffic(self, large_bytes: int) -> tuple[int, int]:
        """Estimated memory traffic ``(large, small)``: every byte accessed of the tensors whose storage spans
        >= ``large_bytes``, and the distinct bytes of the others."""
        large = small = 0
        for key, nbytes in self.accessed.items():
            size = next(end - start for start, end, index in self.spans if index == key[0])
            if size >= large_bytes:
                large += nbytes
            else:
                itemsize = nbytes // sum(a.size for a in self.addresses[key])
                small += np.unique(np.concatenate(self.addresses[key])).size * itemsize
        return large, small


def _tensor_spans(args) -> list:
    spans = []
    for index, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            storage = arg.untyped_storage()
            spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), index))
    return sorted(spans)


@contextlib.contextmanager
def counting():
    """Counts the interpreted launches in the block; yields the list of :class:`Launch` (appended as they
    run). Needs ``TRITON_INTERPRET=1`` when triton was imported."""
    import triton.runtime.interpreter as interp

    launches: list[Launch] = []
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    original = builder.create_masked_load, builder.create_masked_store, executor._init_args_hst

    def record(ptrs, mask, kind):
        launch = launches[-1]
        itemsize = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64).ravel()
        if not addresses.size:
            return
        slot = np.searchsorted(launch.starts, addresses, side="right") - 1
        for j in np.unique(slot):
            start, end, index = launch.spans[j]
            mine = addresses[slot == j]
            assert j >= 0 and (mine < end).all(), f"{launch.kernel}: an access outside every tensor argument"
            key = (index, kind)
            launch.accessed[key] = launch.accessed.get(key, 0) + mine.size * itemsize
            launch.addresses.setdefault(key, []).append(mine)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        record(ptrs, mask, "load")
        return original[0](self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        record(ptrs, mask, "store")
        return original[1](self, ptrs, value, mask, cache_policy)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original[2](self, args_dev, kwargs)
        spans = _tensor_spans(args_hst)
        launches.append(Launch(self.fn.__name__, spans, np.array([s for s, _, _ in spans], dtype=np.uint64)))
        return args_hst, kwargs_hst

    builder.create_masked_load, builder.create_masked_store, executor._init_args_hst = load, store, init_args
    try:
        yield launches
    finally:
        builder.create_masked_load, builder.create_masked_store, executor._init_args_hst = original
