"""Finds or builds the compiled C++ extension ``psp_kernels._C``; says once why it fell back.

Order: the extension built by ``pip install --no-build-isolation -e .`` (``setup.py``); else a JIT build
of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, cached under ``~/.cache/torch_extensions``;
disable with ``PSP_KERNELS_NO_JIT=1``); else ``None``, and the ops use the pure-PyTorch reference.
Exactly one ``UserWarning`` explains a fallback.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cpu_sources(root: Path = CSRC) -> list[str]:
    """Absolute paths of the CPU extension sources, in a stable order."""
    return sorted(glob.glob(str(root / "cpu" / "*.cpp"))) + [str(root / "bindings.cpp")]


CXX_FLAGS = ["-O3", "-fopenmp"]


@functools.lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """Return the C++ extension module, or ``None`` (with one warning) when it is unavailable."""
    try:
        from . import _C  # type: ignore[attr-defined]
        return _C
    except ImportError as err:
        reason = f"psp_kernels._C is not built ({err})"
    if os.environ.get("PSP_KERNELS_NO_JIT", "0") == "1" or not CSRC.is_dir():
        warnings.warn(f"{reason}; JIT build disabled or sources missing: CPU ops use the PyTorch reference. "
                      "Build it with `pip install --no-build-isolation -e .`.", stacklevel=3)
        return None
    try:
        from torch.utils.cpp_extension import load
        module = load(name="psp_kernels_C", sources=cpu_sources(), extra_cflags=CXX_FLAGS,
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: fall back, and say why
        warnings.warn(f"{reason} and the JIT build failed ({type(err).__name__}: {err}); "
                      "CPU ops use the PyTorch reference.", stacklevel=3)
        return None
    warnings.warn(f"{reason}; using a JIT build of csrc/ (cached). "
                  "Build it ahead with `pip install --no-build-isolation -e .`.", stacklevel=3)
    return module
