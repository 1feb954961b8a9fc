"""The kernel table: for every ``psp::`` kernel op and device, the candidate kernels and which one runs.

Every op in :data:`KERNEL_TABLE` is a ``torch.library`` custom op (``psp::<op>``, defined in
``psp_kernels/ops/<stem>.py`` through :func:`define`). The dispatcher picks the device (its CPU and CUDA
kernels are registered with ``register_kernel``); this module picks, within the device, which candidate
kernel runs. Candidates (every one implements the op's schema exactly):

=============  ==================================================================================
``cpp``        C++ CPU kernel, ``torch.ops.psp_native.<op>`` (``csrc/cpu/<stem>.cpp``)
``cuda``       CUDA C++ kernel, ``torch.ops.psp_native.<op>`` (``csrc/cuda/<stem>.cu``)
``triton``     Triton kernel, ``psp_kernels.triton.<op>`` (on CPU tensors only under ``TRITON_INTERPRET=1``)
``reference``  the pure-PyTorch oracle, ``psp_kernels.reference.<op>``: ATen ops in the accumulation dtype
``eager``      the ATen composition in the input's dtype (cuDNN / oneDNN), ``psp_kernels.eager.<op>``
=============  ==================================================================================

Which candidate runs, first rule that applies:

1. a scoped or process-wide override for the device (:func:`use_backend`, :func:`set_backend`), when
   the op has that candidate there;
2. a choice from a loaded table (:func:`load_table`) or measured in this process, for the op's
   (dtype, layout) or its shape class;
3. with :func:`set_autotune` on, CUDA only: the first call of a shape class times every available
   candidate with CUDA events and keeps the fastest (under ``torch.distributed`` the first rank to
   decide publishes its choice in the process group's store, and every rank runs that one);
4. the fixed default: the first available candidate of the device's list in :data:`KERNEL_TABLE`.

Nothing is timed by default. A candidate may decline an input it does not cover by raising
``NotImplementedError`` (the CUTLASS convolution for fp32); the next candidate then runs. Candidates may
differ in the last bits; one process always runs the same candidate for the same inputs, so repeated
runs are bitwise identical. ``print_table()`` prints the table as it stands.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from .geometry import is_channels_last

DEVICES = ("cpu", "cuda")
CANDIDATES = ("cpp", "cuda", "triton", "reference", "eager")

# Why each CUDA default (P = bytes of x, the backbone's output; the byte counts are tested, tests/byte_counter.py):
# - pyramid pooling: the fused passes read x once and write the concat once: 3P forward (pool + copy into the
#   concat, then the branches' upsampling into it) and 3P backward. The eager composition (the unfused module's
#   own ATen calls, ``eager``) reads x once per bin and again for the concat: 9P forward at the four bins
#   (pools 4P, branches written P, the concat reads 2P and writes 2P), over 8P backward, and one launch per
#   bin and pass. Memory-bound passes moving a third of eager's bytes in fewer launches (N=1 60x60 eval, the
#   launch-bound end: 3 fused launches against eager's 21) cannot lose at any size class, so fused Triton is
#   the default, CUDA C++ next, eager then the reference (exact, fp32 copies on 16-bit).
#   The 1x1 reduction convs work on bin-sized [N, C, 50] tensors: no eager twin (the reference is that ATen
#   composition).
# - the head's epilogue (add the branch term, BatchNorm, ReLU) reads the x-half conv output once where the
#   unfused head's concat + 3x3 conv reads the upsampled concat (half its FLOPs and bytes are the branches):
#   fused Triton by default.
# - backbone convolutions: cuDNN (``eager``) until GPU measurements show a fused candidate faster: the conv
#   itself is compute-bound and the fused gain is only the BatchNorm / residual / ReLU epilogue's bytes.
_PPM_CPU = ("cpp", "reference", "triton")
_PPM_CUDA = ("triton", "cuda", "reference")
_MAP_CPU = ("cpp", "reference", "triton", "eager")       # the passes over x-sized maps: an eager twin too
_MAP_CUDA = ("triton", "cuda", "eager", "reference")
_HEAD = (("cpp", "reference", "triton"), ("triton", "reference"))

#: op -> (CPU candidates, CUDA candidates); the first available one is the default.
KERNEL_TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # pyramid pooling: psp_kernels/ops/{pooling,reduction,upsample}.py; the whole-PPM op (ops/ppm.py) is
    # multibin_avg_pool_with_concat -> reduction_conv_bn_relu -> upsample_into, and backward
    # upsample_concat_backward -> reduction_conv_bn_relu_backward -> multibin_avg_pool_backward_add
    "multibin_avg_pool": (_MAP_CPU, _MAP_CUDA),
    "multibin_avg_pool_backward": (_MAP_CPU, _MAP_CUDA),
    "multibin_avg_pool_with_concat": (_MAP_CPU, _MAP_CUDA),
    "multibin_avg_pool_backward_add": (_MAP_CPU, _MAP_CUDA),
    "reduction_conv_bn_relu": (_PPM_CPU, _PPM_CUDA),
    "reduction_conv_bn_relu_backward": (_PPM_CPU, _PPM_CUDA),
    "upsample_concat": (_MAP_CPU, _MAP_CUDA),
    "upsample_concat_backward": (_MAP_CPU, _MAP_CUDA),
    "upsample_into": (_MAP_CPU, _MAP_CUDA),
    # the concat-free head's epilogue: psp_kernels/ops/head.py
    "add_branch_bn_relu": _HEAD,
    "add_branch_bn_relu_backward": _HEAD,
    # backbone convolutions: psp_kernels/ops/conv.py
    "folded_conv": (("cpp", "reference", "triton"), ("eager", "cuda", "triton", "reference")),
    "folded_conv_backward": (("eager",), ("eager",)),
    "training_conv": (("reference", "triton"), ("eager", "triton", "reference")),
    "training_conv_bn_backward": (("reference", "triton"), ("reference", "triton")),
}

_NATIVE = torch.library.Library("psp_native", "FRAGMENT")   # the compiled kernels' schemas (see define)

_state = {"autotune": False}
_process_backend: dict[str, Optional[str]] = {device: None for device in DEVICES}   # set_backend
_scoped_backends: dict[str, list[str]] = {device: [] for device in DEVICES}          # use_backend, innermost last
_choices: dict[tuple[str, str], dict[str, str]] = {}                      # (op, device) -> key -> candidate
_resolved: dict[tuple[str, str, str], Optional[Callable]] = {}            # (candidate, op, device) -> kernel


# --------------------------------------------------------------------------------------------------
# Defining ops
# --------------------------------------------------------------------------------------------------

def define(name: str, schema: str, default: Callable, mutates_args: Sequence[str] = ()):
    """Define the kernel op ``psp::<name>`` with ``schema`` and route its CPU and CUDA kernels through
    :data:`KERNEL_TABLE`.

    ``default`` (the reference, or the eager composition) runs on devices without a registered kernel.
    The compiled twin ``psp_native::<name>`` gets the same schema, so the C++ kernels registered for it
    (``TORCH_LIBRARY_IMPL(psp_native, CPU | CUDA, m)``) are checked against it by the dispatcher.
    Returns the ``torch.library.CustomOpDef`` (register its fake kernel and autograd on it).

    Raises:
        KeyError: ``name`` is not in :data:`KERNEL_TABLE`.
    """
    if name not in KERNEL_TABLE:
        raise KeyError(f"op {name!r} has no entry in KERNEL_TABLE")
    op = torch.library.custom_op(f"psp::{name}", default, mutates_args=tuple(mutates_args), schema=schema)
    _NATIVE.define(name + schema)
    for device in DEVICES:
        op.register_kernel(device)(_router(name, device))
    return op


def _router(name: str, device: str) -> Callable:
    def run(*args):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        if device == "cuda":
            with torch.cuda.device(tensor.device):
                return _run(name, device, tensor, args)
        return _run(name, device, tensor, args)
    run.__name__ = f"{name}_{device}"
    return run


def _run(name: str, device: str, tensor: torch.Tensor, args: tuple):
    order = _order(name, device, tensor, args)
    declined = None
    for candidate in order:
        try:
            return _kernel(candidate, name, device)(*args)
        except NotImplementedError as err:     # the candidate declines these inputs: try the next one
            declined = err
    raise declined if declined is not None else RuntimeError(f"psp::{name}: no kernel available on {device}")


# --------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------

def _kernel(candidate: str, name: str, device: str) -> Optional[Callable]:
    """The candidate's kernel for op ``name`` on ``device``, or None where it has none (cached)."""
    key = (candidate, name, device)
    if key not in _resolved:
        _resolved[key] = _resolve(candidate, name, device)
    return _resolved[key]


def _resolve(candidate: str, name: str, device: str) -> Optional[Callable]:
    if candidate not in _candidates(name, device):
        return None
    if candidate in ("cpp", "cuda"):
        from ._extension import load_extension
        if not load_extension():
            return None
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"psp_native::{name}", device.upper()):
            return None
        return getattr(torch.ops.psp_native, name).default
    if candidate == "triton":
        if device == "cpu" and not triton_interpreter():
            return None
        try:
            from . import triton as module
        except ImportError:
            return None
    elif candidate == "reference":
        from . import reference as module
    else:
        from . import eager as module
    return getattr(module, name, None)


def _candidates(name: str, device: str) -> tuple[str, ...]:
    cpu, cuda = KERNEL_TABLE[name]
    return cpu if device == "cpu" else cuda


def available(name: str, device: str) -> list[str]:
    """The candidates of op ``name`` that can run on ``device`` in this process, default first."""
    return [c for c in _candidates(name, device) if _kernel(c, name, device) is not None]


def triton_interpreter() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1`` before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------

def _layout(t: torch.Tensor) -> str:
    return "channels_last" if is_channels_last(t) else "contiguous"


def _dims(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(str(1 << max(0, int(d) - 1).bit_length()) for d in value.shape)
    if isinstance(value, (list, tuple)):
        return f"{len(value)}*{_dims(value[0])}" if value and isinstance(value[0], torch.Tensor) else \
            ",".join(map(str, value))
    return str(value)


def _keys(tensor: torch.Tensor, args: tuple) -> tuple[str, str]:
    """(fixed key ``dtype/layout``, shape-class key: that plus every argument, sizes rounded up to powers
    of two) of one call."""
    fixed = f"{str(tensor.dtype).removeprefix('torch.')}/{_layout(tensor)}"
    return fixed, fixed + "/" + "/".join(_dims(a) for a in args)


def _order(name: str, device: str, tensor: torch.Tensor, args: tuple) -> list[str]:
    """The candidates to try for this call, the chosen one first."""
    ready = available(name, device)
    if not ready:
        raise RuntimeError(f"psp::{name}: no kernel of {_candidates(name, device)} can run on {device}")
    chosen = next((o for o in _overrides(device) if o in ready), None)
    if chosen is None:
        table = _choices.get((name, device))
        if table or (_state["autotune"] and device in _AUTOTUNE_DEVICES and len(ready) > 1):
            fixed, shape_class = _keys(tensor, args)
            table = table or {}
            chosen = table.get(shape_class) or table.get(fixed)
            if chosen is None and _state["autotune"] and device in _AUTOTUNE_DEVICES and len(ready) > 1 \
                    and not _capturing(device):
                chosen = _measure(name, device, ready, args, shape_class)
            if chosen not in ready:
                chosen = None
    if chosen is None:
        return ready
    return [chosen] + [c for c in ready if c != chosen]


# --------------------------------------------------------------------------------------------------
# Measured choice (opt-in)
# --------------------------------------------------------------------------------------------------

_AUTOTUNE_DEVICES = {"cuda"}


def _capturing(device: str) -> bool:
    return device == "cuda" and torch.cuda.is_current_stream_capturing()


def _time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median of ``reps`` timed calls (CUDA events on the current stream) after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _time_candidate(candidate: str, run: Callable[[], object]) -> float:
    """Milliseconds of one candidate's call (the measurement :func:`set_autotune` makes)."""
    return _time_ms(run)


def _measure(name: str, device: str, ready: list[str], args: tuple, shape_class: str) -> Optional[str]:
    times = {}
    for candidate in ready:
        kernel = _kernel(candidate, name, device)
        try:
            times[candidate] = _time_candidate(candidate, lambda: kernel(*args))
        except NotImplementedError:
            continue
    if not times:
        return None
    choice = _agree(name, device, shape_class, min(times, key=times.get))
    _choices.setdefault((name, device), {})[shape_class] = choice
    return choice


def _agree(name: str, device: str, shape_class: str, choice: str) -> str:
    """Under ``torch.distributed``: the first rank to decide stores its choice in the process group's
    store (compare-and-set) and every rank takes the stored one, so all ranks run the same kernel."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return choice
    store = dist.distributed_c10d._get_default_store()
    key = f"psp_kernels/autotune/{name}/{device}/{shape_class}"
    return store.compare_set(key, "", choice).decode()


def set_autotune(enabled: bool) -> None:
    """Opt in (``True``) or out of measured kernel choice on CUDA, in the spirit of
    ``torch.backends.cudnn.benchmark``: the first call of each op and shape class (dtypes, layout, sizes
    rounded up to powers of two, the other arguments) times every available candidate with CUDA events
    (3 calls after a warm-up) and keeps the fastest for the process. Nothing is timed during CUDA-graph
    capture. Under ``torch.distributed`` every rank uses the first rank's choice. Choices already made stay.
    """
    _state["autotune"] = bool(enabled)


def autotune_enabled() -> bool:
    """Whether :func:`set_autotune` is on."""
    return _state["autotune"]


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------

def backend_devices(name: str, device: Optional[str] = None) -> list[str]:
    """The devices (``device`` alone, or every device where ``name`` is a candidate) on which candidate
    ``name`` can run in this process.

    Raises:
        ValueError: unknown backend or device name, or a backend without kernels on that device.
        RuntimeError: the backend cannot run there here (the library not built, no Triton interpreter).
    """
    if name not in CANDIDATES:
        raise ValueError(f"backend must be one of {CANDIDATES}, got {name!r}")
    if device is not None:
        device = torch.device(device).type
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        devices = [device]
    else:
        devices = [d for d in DEVICES if any(name in _candidates(op, d) for op in KERNEL_TABLE)]
    for d in devices:
        if not any(name in _candidates(op, d) for op in KERNEL_TABLE):
            raise ValueError(f"backend {name!r} has no kernel on {d}: its candidates there are "
                             f"{sorted({c for op in KERNEL_TABLE for c in _candidates(op, d)})}")
    usable = [d for d in devices if any(_kernel(name, op, d) is not None for op in KERNEL_TABLE)]
    if not usable:
        raise RuntimeError(f"backend {name!r} cannot run on {'/'.join(devices)} here: " + _why_unavailable(name))
    return usable


def _why_unavailable(name: str) -> str:
    if name in ("cpp", "cuda"):
        return ("the C++ extension is not built" + (" with CUDA" if name == "cuda" else "") +
                " (`pip install --no-build-isolation -e .`)")
    return "Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before psp_kernels is imported"


def _overrides(device: str) -> list[str]:
    """The overrides in force on ``device``, innermost first."""
    process = _process_backend[device]
    return _scoped_backends[device][::-1] + ([process] if process else [])


def set_backend(name: Optional[str], device: Optional[str] = None) -> None:
    """Run candidate ``name`` for every op that has it on ``device`` (``"cpu"``, ``"cuda"``; None: every
    device where it can run), process-wide; ``None`` clears the process-wide choice (of ``device``, or of
    every device). Ops without that candidate keep their default.

    Raises:
        ValueError: unknown backend or device name.
        RuntimeError: the backend cannot run on that device here (not built, no Triton interpreter, ...).
    """
    if name is None:
        for device_ in ([torch.device(device).type] if device else DEVICES):
            _process_backend[device_] = None
        return
    for device_ in backend_devices(name, device):
        _process_backend[device_] = name


@contextlib.contextmanager
def use_backend(name: str, device: Optional[str] = None) -> Iterator[None]:
    """:func:`set_backend` for the body of a ``with`` block only (tests, debugging); nests, the innermost
    override an op has wins."""
    devices = backend_devices(name, device)
    for device_ in devices:
        _scoped_backends[device_].append(name)
    try:
        yield
    finally:
        for device_ in devices:
            _scoped_backends[device_].pop()


def get_backend(device: str) -> Optional[str]:
    """The innermost override in force on ``device`` (None: the table decides)."""
    overrides = _overrides(torch.device(device).type)
    return overrides[0] if overrides else None


# --------------------------------------------------------------------------------------------------
# The table: print, save, load
# --------------------------------------------------------------------------------------------------

def table() -> list[dict]:
    """One row per (op, device): candidates, the available ones, and what runs by default."""
    rows = []
    for name in KERNEL_TABLE:
        for device in DEVICES:
            ready = available(name, device)
            runs = next((o for o in _overrides(device) if o in ready), ready[0] if ready else None)
            rows.append({"op": name, "device": device, "candidates": list(_candidates(name, device)),
                         "available": ready, "default": runs,
                         "choices": dict(_choices.get((name, device), {}))})
    return rows


def print_table(file=None) -> None:
    """Print the (op, device) -> kernel table: the kernel that runs by default first, then the other
    candidates (``-`` marks one that cannot run in this process), and any loaded or measured choices."""
    file = file or sys.stdout
    width = max(map(len, KERNEL_TABLE)) + 2
    print(f"{'op':<{width}}{'device':<8}kernel (then the other candidates; - = unavailable here)", file=file)
    for row in table():
        others = [c if c in row["available"] else f"-{c}" for c in row["candidates"] if c != row["default"]]
        print(f"{row['op']:<{width}}{row['device']:<8}{row['default'] or '(none)':<10} {' '.join(others)}",
              file=file)
        for key, choice in sorted(row["choices"].items()):
            print(f"{'':<{width}}{'':<8}  {key}: {choice}", file=file)
    print(f"autotune: {'on' if autotune_enabled() else 'off'}", file=file)


def save_table(path: os.PathLike | str) -> Path:
    """Write the loaded and measured choices as JSON (``{"choices": {op: {device: {key: candidate}}}}``,
    keys ``dtype/layout`` or a shape class), atomically (temporary file, then rename). Returns the path."""
    data: dict = {"version": 1, "choices": {}}
    for (name, device), keys in sorted(_choices.items()):
        if keys:
            data["choices"].setdefault(name, {})[device] = dict(sorted(keys.items()))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def load_table(path: os.PathLike | str) -> None:
    """Load choices saved by :func:`save_table` (or written by hand: a key ``dtype/layout`` such as
    ``bfloat16/channels_last`` fixes the choice for that dtype and layout), replacing those of the same
    (op, device).

    Raises:
        FileNotFoundError: no such file. ValueError: not a table, or an unknown op, device or candidate
            (named in the message).
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON kernel table ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
        raise ValueError(f"{path}: expected {{'choices': {{op: {{device: {{key: candidate}}}}}}}}")
    loaded = {}
    for name, devices in data["choices"].items():
        if name not in KERNEL_TABLE:
            raise ValueError(f"{path}: unknown op {name!r}")
        for device, keys in devices.items():
            if device not in DEVICES:
                raise ValueError(f"{path}: op {name!r}: unknown device {device!r}")
            for key, candidate in keys.items():
                if candidate not in _candidates(name, device):
                    raise ValueError(f"{path}: op {name!r} on {device}: {candidate!r} is not one of its "
                                     f"candidates {_candidates(name, device)}")
            loaded[(name, device)] = dict(keys)
    _choices.update(loaded)


def clear_choices() -> None:
    """Forget every loaded and measured choice."""
    _choices.clear()
