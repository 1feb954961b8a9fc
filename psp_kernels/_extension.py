"""Loads the compiled kernels (``psp_kernels/_C*.so``) into the dispatcher, or says once why it cannot.

The library holds no Python bindings: its C++ and CUDA C++ kernels register themselves with
``TORCH_LIBRARY_IMPL(psp_native, CPU | CUDA, m)`` when it is loaded (``torch.ops.load_library``), as the
kernels of the ``psp_native::<op>`` schemas that :func:`psp_kernels.dispatch.define` declares.

Order: the library built by ``pip install --no-build-isolation -e .`` (``setup.py``); else a JIT build
of the CPU sources under ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, cached under
``~/.cache/torch_extensions``; disable with ``PSP_KERNELS_NO_JIT=1``); else nothing, and the kernel table
(``psp_kernels.dispatch``) runs the other candidates (on CPU the pure-PyTorch reference). Exactly one
``UserWarning`` explains a fallback.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"
# setup.py's flags: -ffp-contract=off keeps FMA out of the wider instruction sets' code (csrc/cpu/isa.h), so
# every instruction set gives the same bits.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def cpu_sources(root: Path = CSRC) -> list[str]:
    """Absolute paths of the CPU kernel sources, in a stable order."""
    return sorted(glob.glob(str(root / "cpu" / "*.cpp")))


def built_library() -> Path | None:
    """The library ``setup.py`` built next to the package, if any."""
    found = sorted(PACKAGE.glob("_C*.so")) + sorted(PACKAGE.glob("_C*.pyd"))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def load_extension() -> bool:
    """Load the compiled kernels once; False (with one warning) when they are unavailable."""
    library = built_library()
    if library is not None:
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError as err:
            reason = f"{library.name} cannot be loaded ({err})"
    else:
        reason = "psp_kernels/_C is not built"
    if os.environ.get("PSP_KERNELS_NO_JIT", "0") == "1" or not CSRC.is_dir():
        warnings.warn(f"{reason}; JIT build disabled or sources missing: CPU ops use the PyTorch reference. "
                      "Build it with `pip install --no-build-isolation -e .`.", stacklevel=3)
        return False
    try:
        from torch.utils.cpp_extension import load
        load(name="psp_kernels_C", sources=cpu_sources(), extra_cflags=CXX_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: fall back, and say why
        warnings.warn(f"{reason} and the JIT build failed ({type(err).__name__}: {err}); "
                      "CPU ops use the PyTorch reference.", stacklevel=3)
        return False
    warnings.warn(f"{reason}; using a JIT build of csrc/ (cached). "
                  "Build it ahead with `pip install --no-build-isolation -e .`.", stacklevel=3)
    return True
