"""Test-session setup: the Triton interpreter for CPU tensors, a fresh Inductor cache, shared fixtures.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is set here, at collection.
"""

import os
import tempfile

# On a GPU machine, run the compiled-Triton tests apart: TRITON_INTERPRET=0 (see tests/test_gpu_triton.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per session: its FX-graph cache key does not cover a custom op's schema, so code
# compiled against an older psp:: schema would otherwise be reused (seen with torch 2.13.0).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="psp-inductor-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name)``: the module ``bench/<name>.py``, imported from its file (bench/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    return load
