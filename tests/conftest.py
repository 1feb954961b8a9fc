"""Shared test set-up: the Triton mode and the kernel backends a test runs on (plain helpers, the inputs
and the one low-precision rule, are in ``tests/helpers.py``).

Triton mode (``--triton``): ``interpret`` runs the Triton kernels on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set before anything imports triton); ``compiled`` runs them compiled, on a GPU;
``auto`` (default) interprets only when there is no CUDA GPU, so ``python -m pytest tests`` on a GPU
machine tests compiled Triton.

Backends: a test that takes the ``backend`` fixture runs once per (device, kernel candidate) of the kernel
table (``psp_kernels.dispatch``): on CPU tensors ``reference``, ``cpp`` (the compiled C++ kernels) and, when
interpreting, ``triton``; on CUDA tensors ``reference``, ``triton`` and ``cuda`` (CUDA C++), skipped without
a GPU; in tests marked ``eager_twin`` also ``eager`` on both. The fixture routes every op to that candidate
(``psp_kernels.use_backend``) for the test's body.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import pytest
import torch

# A fresh Inductor cache per session: its FX-graph cache key does not cover a custom op's schema, so code
# compiled against an older psp:: schema would otherwise be reused (seen with torch 2.13.0).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="psp-inductor-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

NEEDS_GPU = "needs a CUDA GPU"


def pytest_addoption(parser):
    parser.addoption("--triton", choices=("auto", "interpret", "compiled"), default="auto",
                     help="run Triton kernels in the interpreter on CPU tensors, or compiled on a GPU "
                          "(auto: interpret without a CUDA GPU)")


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # pytest-xdist (scripts/run.sh test: -n auto)
    if workers > 1:   # share the cores: each worker's intra-op threads (more would oversubscribe them)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    mode = config.getoption("--triton")
    if mode == "auto":
        mode = "compiled" if torch.cuda.is_available() else "interpret"
    os.environ["TRITON_INTERPRET"] = "1" if mode == "interpret" else "0"


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """A kernel candidate on a device: ``device`` ("cpu" / "cuda") and ``name`` (a dispatch candidate)."""

    device: str
    name: str

    def __str__(self) -> str:
        return f"{self.device}-{self.name}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends(eager: bool = False) -> list[Backend]:
    """Every (device, candidate) the suite covers on this machine (CUDA ones are skipped without a GPU); with
    ``eager`` also the eager ATen twin (``psp_kernels/eager.py``) of the ops that have one."""
    cpu = ["reference", "cpp"] + (["triton"] if interpreting() else []) + (["eager"] if eager else [])
    cuda = ["reference", "triton", "cuda"] + (["eager"] if eager else [])
    return [Backend("cpu", name) for name in cpu] + [Backend("cuda", name) for name in cuda]


def pytest_generate_tests(metafunc):
    """Parametrise the ``backend`` fixture over :func:`backends` (the eager twins too in a module or test marked
    ``eager_twin``), or over the subset a ``@pytest.mark.backends(*names, devices=(...))`` marker names (a test
    of one kernel family).

    With ``@pytest.mark.cases(cases, interpreted=subset, ids=fn)`` the test's ``case`` argument is
    parametrised jointly with ``backend``: every backend runs ``cases`` except Triton in the interpreter,
    which runs ``subset`` (the interpreter runs one program at a time: large maps take minutes there, and
    compiled Triton on a GPU runs them all)."""
    if "backend" not in metafunc.fixturenames:
        return
    chosen = backends(eager=metafunc.definition.get_closest_marker("eager_twin") is not None)
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        names = marker.args or {b.name for b in chosen}
        devices = marker.kwargs.get("devices", ("cpu", "cuda"))
        chosen = [b for b in chosen if b.name in names and b.device in devices]

    def marks(b):
        return [pytest.mark.gpu] if b.device == "cuda" else []
    cases = metafunc.definition.get_closest_marker("cases")
    if cases is None:
        metafunc.parametrize("backend", [pytest.param(b, id=str(b), marks=marks(b)) for b in chosen], indirect=True)
        return
    all_cases, interpreted, ids = cases.args[0], cases.kwargs["interpreted"], cases.kwargs.get("ids", str)
    params = [pytest.param(b, case, id=f"{b}-{ids(case)}", marks=marks(b)) for b in chosen
              for case in (interpreted if (b.device, b.name) == ("cpu", "triton") else all_cases)]
    metafunc.parametrize("backend,case", params, indirect=["backend"])


@pytest.fixture
def backend(request):
    """The (device, candidate) of this test case, in force for the test's body. On CUDA the body runs with
    ``torch.backends.cudnn.allow_tf32`` off: fp32 convolutions then run in IEEE fp32, in the kernels (see
    ``conv_dot_precision``) as in cuDNN, and are judged by the one low-precision rule against the fp32
    reference; TF32 is judged by its own tests (tests/test_tf32.py)."""
    import psp_kernels
    from helpers import cudnn_tf32
    chosen: Backend = request.param
    if chosen.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU)
    ieee = cudnn_tf32(False) if chosen.device == "cuda" else contextlib.nullcontext()
    with psp_kernels.use_backend(chosen.name, chosen.device), ieee:
        yield chosen


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NEEDS_GPU)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def threads():
    """``set_threads(n)`` for the test; torch's thread count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------

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
