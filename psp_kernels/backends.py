"""Backend selection for the fused PPM ops: ``auto`` (default), ``triton``, ``cuda``, ``cpp``, ``reference``.

``auto`` on CUDA tensors measures: where both the Triton kernels and the CUDA C++ kernels of the compiled
extension are available, the first call of each backend function for a *shape class* (dtypes, memory
formats, every dimension rounded up to a power of two, and the non-tensor arguments) times both with
CUDA events and keeps the faster one for the rest of the process (:class:`MeasuredChoice`); with only one
of them, it is used. ``auto`` on CPU tensors picks the compiled C++ extension. Either falls back to the
pure-PyTorch reference when nothing compiled is available (the extension loader warns once). An explicit
choice is honoured or rejected with a clear error: ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
(the Triton interpreter, used by the tests), ``cpp`` needs CPU tensors, ``cuda`` CUDA tensors and an
extension built against a CUDA-enabled torch.

Usage::

    psp_kernels.set_backend("reference")          # process-wide
    with psp_kernels.use_backend("cpp"): ...      # scoped
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
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


def _cuda_extension() -> ModuleType | None:
    from ._extension import load_extension
    ext = load_extension()
    return getattr(ext, "cuda", None)


def _shape_class(value: object) -> object:
    """Hashable summary of an argument for :class:`MeasuredChoice`: tensors by dtype, layout and
    power-of-two-rounded shape; lists by their first element; other values as they are."""
    if isinstance(value, torch.Tensor):
        rounded = tuple(1 << max(0, int(d) - 1).bit_length() for d in value.shape)
        return (value.dtype, value.stride(1) == 1 if value.dim() == 4 else False, rounded)
    if isinstance(value, (list, tuple)):
        return (len(value), _shape_class(value[0])) if value and isinstance(value[0], torch.Tensor) else tuple(value)
    return value


def _time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()                                                   # warm-up: compilation, caches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class MeasuredChoice:
    """``auto`` on CUDA with several backends: a backend-shaped object whose functions dispatch, per
    function and shape class, to the candidate measured fastest on its first call.

    Every candidate implements the same contract, so the choice changes speed only (results may differ in
    the last bits between candidates; within a process a shape class always runs the same one, so repeated
    runs are bitwise identical). A candidate may decline inputs it does not cover by raising
    NotImplementedError (the CUTLASS convolution for fp32): the others are measured without it. During
    CUDA-graph capture nothing is timed: an unmeasured shape class runs the first candidate that accepts it.
    ``choices`` maps ``(function, shape class)`` to the chosen name.
    """

    def __init__(self, candidates: dict[str, object]):
        self.candidates = candidates
        self.choices: dict[tuple, str] = {}

    def __getattr__(self, name: str) -> Callable:
        impls = {key: getattr(mod, name) for key, mod in self.candidates.items() if hasattr(mod, name)}
        if not impls:
            raise AttributeError(name)             # no candidate has it: hasattr() must say so

        def dispatch(*args):
            key = (name, tuple(_shape_class(a) for a in args))
            choice = self.choices.get(key)
            if choice is not None:
                return impls[choice](*args)
            measure = len(impls) > 1 and not torch.cuda.is_current_stream_capturing()
            times, declined = {}, None
            for k, impl in impls.items():
                try:
                    if not measure:
                        return impl(*args)
                    times[k] = _time_ms(lambda: impl(*args))
                except NotImplementedError as e:   # the candidate declines these inputs
                    declined = e
            if not times:
                raise declined
            choice = min(times, key=times.get)
            self.choices[key] = choice
            return impls[choice](*args)
        return dispatch


_MEASURED: dict[str, MeasuredChoice] = {}


def resolve(device: torch.device, name: str | None = None) -> ModuleType | MeasuredChoice:
    """Return the backend for tensors on ``device``.

    The backend provides ``pool_forward``, ``pool_backward``, ``project_forward``, ``project_backward``,
    ``upsample_forward`` and ``upsample_backward``, and the fused-pass functions ``pool_concat_forward``,
    ``upsample_into``, ``pool_backward_add`` (see ``psp_kernels.reference``); all but ``cuda`` also the
    head epilogue's ``head_forward`` / ``head_backward`` (``psp_kernels.ops.head`` uses Triton for CUDA
    tensors when the chosen backend lacks them).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the requested backend cannot run on ``device`` (e.g. ``cpp`` for CUDA tensors,
            ``triton`` for CPU tensors without ``TRITON_INTERPRET=1``, ``cpp`` with no built extension,
            ``cuda`` without an extension built with CUDA).
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
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got {device}")
        cuda = _cuda_extension()
        if cuda is None:
            raise RuntimeError("backend 'cuda' requested but psp_kernels._C has no CUDA kernels: build it with a "
                               "CUDA-enabled torch (`pip install --no-build-isolation -e .`)")
        return cuda
    # auto
    if device.type == "cuda":
        cuda = _cuda_extension()
        if cuda is None:
            return _triton()
        key = str(device)
        if key not in _MEASURED:
            _MEASURED[key] = MeasuredChoice({"triton": _triton(), "cuda": cuda})
        return _MEASURED[key]
    if device.type == "cpu":
        return load_extension() or _reference()
    return _reference()


def resolve_for(device: torch.device, function: str) -> ModuleType | MeasuredChoice:
    """The chosen backend for ``device`` when it implements ``function``; else Triton for CUDA tensors and
    the reference for CPU tensors (the functions only some backends have: the head epilogue, the backbone
    convolutions, or an extension built before they existed)."""
    backend = resolve(device)
    if hasattr(backend, function):
        return backend
    return resolve(device, "triton" if device.type == "cuda" else "reference")
