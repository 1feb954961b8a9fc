"""The kernel table (``psp_kernels.dispatch``) and the compiled library's loading.

Checked: every kernel op is a ``psp::`` custom op whose compiled twin ``psp_native::<op>`` has the same
schema; the fixed default per (op, device); ``use_backend`` / ``set_backend`` per device, nested, with
clear errors; ops without the forced candidate keep their default; measured choice (``set_autotune``) with
a fake timer: once per shape class, declines, agreement across ``torch.distributed`` ranks through the
store; saving and loading the choices as JSON; ``print_dispatch``; the package without a built library (one
warning, the reference on CPU); ``PSP_KERNELS_BACKEND``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import psp_kernels
from helpers import make_ppm, make_x
from psp_kernels import dispatch
from psp_kernels.dispatch import KERNEL_TABLE

ROOT = Path(__file__).resolve().parents[1]
COMPOSITIONS = {"pyramid_pooling", "pyramid_pooling_backward"}   # ops made of table ops (psp_kernels/ops/ppm.py)


def native_ops(x: torch.Tensor, fn) -> set[str]:
    """The psp_native:: ops (compiled kernels) ``fn(x)`` runs, from the profiler."""
    with torch.profiler.profile() as prof:
        fn(x)
    return {e.name for e in prof.events() if e.name.startswith("psp_native::")}


@pytest.fixture
def clean_table():
    """Loaded / measured choices and the autotune switch restored after the test."""
    saved, autotune = dict(dispatch._choices), dispatch.autotune_enabled()
    dispatch.clear_choices()
    yield
    dispatch.clear_choices()
    dispatch._choices.update(saved)
    dispatch.set_autotune(autotune)


# --------------------------------------------------------------------------------------------------
# Ops and schemas
# --------------------------------------------------------------------------------------------------

def public_ops() -> set[str]:
    return {name for name in dir(torch.ops.psp) if not name.startswith("_")
            and isinstance(getattr(torch.ops.psp, name), torch._ops.OpOverloadPacket)}


def test_every_psp_op_is_in_the_table_or_a_composition_of_table_ops():
    assert public_ops() == set(KERNEL_TABLE) | COMPOSITIONS


@pytest.mark.parametrize("op", sorted(KERNEL_TABLE))
def test_compiled_twin_has_the_op_schema(op):
    public = str(getattr(torch.ops.psp, op).default._schema).replace("SymInt", "int")
    native = str(getattr(torch.ops.psp_native, op).default._schema)
    assert native == public.replace("psp::", "psp_native::", 1)


@pytest.mark.parametrize("op", sorted(KERNEL_TABLE))
def test_every_candidate_implements_the_op(op):
    """Every candidate the table names for an op has it (no silent gap; the CUDA C++ candidate's kernels
    are checked in tests/test_kernels_compile.py)."""
    for device, candidates in zip(dispatch.DEVICES, KERNEL_TABLE[op]):
        assert candidates, (op, device)
        for candidate in candidates:
            if candidate == "cuda":
                continue
            if candidate == "cpp":
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"psp_native::{op}", "CPU"), op
                continue
            module = {"triton": "psp_kernels.triton", "reference": "psp_kernels.reference",
                      "eager": "psp_kernels.eager"}[candidate]
            assert callable(getattr(sys.modules.get(module) or __import__(module, fromlist=["x"]), op)), (op, candidate)


def test_cpu_defaults_are_the_compiled_kernels():
    """With the library built, every op with a C++ kernel runs it on CPU by default, through the dispatcher."""
    for row in dispatch.table():
        if row["device"] == "cpu" and "cpp" in row["candidates"]:
            assert row["default"] == "cpp", row
    x = make_x(2, 4, 13, 17)
    assert native_ops(x, psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}


def test_cuda_defaults_never_time_anything():
    """The CUDA defaults are fixed: the first available candidate of each op (eager cuDNN for the convs)."""
    for op, (_, cuda) in KERNEL_TABLE.items():
        assert cuda[0] in ("triton", "eager", "reference"), op
    assert KERNEL_TABLE["folded_conv"][1][0] == "eager" and KERNEL_TABLE["training_conv"][1][0] == "eager"
    assert not dispatch.autotune_enabled()


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------

def test_use_backend_is_scoped_per_device_and_nests():
    x = make_x(2, 4, 13, 17)
    with psp_kernels.use_backend("reference", "cpu"):
        assert psp_kernels.get_backend("cpu") == "reference" and psp_kernels.get_backend("cuda") is None
        assert native_ops(x, psp_kernels.multibin_avg_pool) == set()
        with psp_kernels.use_backend("cpp", "cpu"):
            assert native_ops(x, psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}
        assert native_ops(x, psp_kernels.multibin_avg_pool) == set()
    assert psp_kernels.get_backend("cpu") is None
    assert native_ops(x, psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}


def test_set_backend_is_process_wide_and_clears():
    x = make_x(2, 4, 13, 17)
    psp_kernels.set_backend("reference", "cpu")
    try:
        assert native_ops(x, psp_kernels.multibin_avg_pool) == set()
        with psp_kernels.use_backend("cpp", "cpu"):           # a scoped override wins over the process-wide one
            assert native_ops(x, psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}
    finally:
        psp_kernels.set_backend(None)
    assert psp_kernels.get_backend("cpu") is None


def test_an_op_without_the_forced_candidate_keeps_its_default():
    """``eager`` forced on CPU: the PPM's pooling and upsampling passes run their eager twins, the 1x1
    reduction convs (no eager twin) keep their C++ kernel."""
    x = make_x(2, 8, 13, 17)
    ppm = make_ppm(8, (1, 2, 3, 6))[0].eval()
    with psp_kernels.use_backend("eager", "cpu"):
        assert native_ops(x, ppm) == {"psp_native::reduction_conv_bn_relu"}
    assert "psp_native::multibin_avg_pool_with_concat" in native_ops(x, ppm)


@pytest.mark.parametrize("name, device, error, match", [
    ("cuda-graphs", None, ValueError, "backend must be one of"),
    ("cpp", "cuda", ValueError, "backend 'cpp' has no kernel on cuda"),
    ("reference", "xla", ValueError, "device must be one of"),
])
def test_bad_override_is_explained(name, device, error, match):
    with pytest.raises(error, match=match):
        psp_kernels.set_backend(name, device)
    with pytest.raises(error, match=match):
        with psp_kernels.use_backend(name, device):
            pass


def test_triton_on_cpu_without_the_interpreter_is_explained():
    code = ("import psp_kernels\n"
            "try:\n    psp_kernels.set_backend('triton', 'cpu')\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"}).stdout
    assert "ERROR backend 'triton' cannot run on cpu here" in out and "TRITON_INTERPRET=1" in out, out


# --------------------------------------------------------------------------------------------------
# Measured choice
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_timing(monkeypatch, clean_table):
    """Autotune on CPU tensors with a fake timer: ``times[candidate]`` ms; the calls timed are recorded."""
    times, timed = {"cpp": 2.0, "reference": 1.0, "triton": 3.0, "eager": 4.0}, []

    def fake(candidate, run):
        run()
        timed.append(candidate)
        return times[candidate]
    monkeypatch.setattr(dispatch, "_AUTOTUNE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(dispatch, "_time_candidate", fake)
    dispatch.set_autotune(True)
    return times, timed


def test_autotune_measures_once_per_shape_class(fake_timing):
    times, timed = fake_timing
    x = make_x(2, 4, 13, 17)
    psp_kernels.multibin_avg_pool(x)                                  # times every candidate once
    assert sorted(timed) == sorted(dispatch.available("multibin_avg_pool", "cpu"))
    timed.clear()
    assert native_ops(make_x(2, 4, 14, 18), psp_kernels.multibin_avg_pool) == set()   # same class: the reference
    assert timed == []
    times.update(cpp=0.5)
    psp_kernels.multibin_avg_pool(make_x(2, 4, 40, 40))              # another class: timed anew
    assert timed
    assert native_ops(make_x(2, 4, 40, 40), psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}
    choices = dispatch._choices[("multibin_avg_pool", "cpu")]
    assert sorted(choices.values()) == ["cpp", "reference"] and all(k.startswith("float64/contiguous/")
                                                                    for k in choices)


def decline(monkeypatch, declining: str) -> None:
    """Make candidate ``declining`` raise NotImplementedError for every input (as the CUTLASS conv does for
    inputs it does not cover)."""
    real = dispatch._kernel

    def kernel(candidate, name, device):
        found = real(candidate, name, device)
        if candidate != declining or found is None:
            return found

        def declined(*args):
            raise NotImplementedError("not these inputs")
        return declined
    monkeypatch.setattr(dispatch, "_kernel", kernel)


def test_autotune_skips_a_candidate_that_declines(fake_timing, monkeypatch):
    decline(monkeypatch, "reference")
    x = make_x(2, 4, 13, 17)
    psp_kernels.multibin_avg_pool(x)
    assert set(dispatch._choices[("multibin_avg_pool", "cpu")].values()) == {"cpp"}
    assert native_ops(x, psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}


def test_a_declining_default_passes_the_input_on(monkeypatch, clean_table):
    decline(monkeypatch, "cpp")
    x = make_x(2, 4, 13, 17)
    expected = psp_kernels.reference.multibin_avg_pool(x, (1, 2, 3, 6))
    torch.testing.assert_close(psp_kernels.multibin_avg_pool(x), expected)
    assert native_ops(x, psp_kernels.multibin_avg_pool) == set()


def _agree_worker(rank: int, store_path: str, out_path: str) -> None:
    import time
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(0.5)                            # rank 0 decides first
    mine = ["cpp", "reference"][rank]
    got = dispatch._agree("multibin_avg_pool", "cuda", "float32/contiguous/2x4x16x32", mine)
    Path(out_path + f".{rank}").write_text(got)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_autotune_choice_is_the_same_on_every_rank(tmp_path):
    """Each rank measures its own times; the first rank to decide publishes its choice in the process
    group's store (compare-and-set) and every rank runs that one."""
    out = str(tmp_path / "choice")
    mp.start_processes(_agree_worker, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    assert Path(out + ".0").read_text() == Path(out + ".1").read_text() == "cpp"


# --------------------------------------------------------------------------------------------------
# The table as a file, and printed
# --------------------------------------------------------------------------------------------------

def test_choices_save_and_load(tmp_path, clean_table):
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"version": 1, "choices": {
        "multibin_avg_pool": {"cpu": {"float64/contiguous": "reference"}},
        "folded_conv": {"cuda": {"bfloat16/channels_last": "cuda"}}}}))
    psp_kernels.load_dispatch_table(path)
    x = make_x(2, 4, 13, 17)
    assert native_ops(x, psp_kernels.multibin_avg_pool) == set()                          # loaded: reference
    assert native_ops(x.float(), psp_kernels.multibin_avg_pool) == {"psp_native::multibin_avg_pool"}  # other dtype
    saved = psp_kernels.save_dispatch_table(tmp_path / "again.json")
    assert json.loads(saved.read_text()) == json.loads(path.read_text())


@pytest.mark.parametrize("content, match", [
    ("not json", "not a JSON kernel table"),
    (json.dumps({"multibin_avg_pool": {}}), "expected"),
    (json.dumps({"choices": {"nope": {}}}), "unknown op 'nope'"),
    (json.dumps({"choices": {"folded_conv": {"tpu": {}}}}), "unknown device 'tpu'"),
    (json.dumps({"choices": {"folded_conv": {"cuda": {"float32/contiguous": "cpp"}}}}), "'cpp' is not one of"),
])
def test_load_rejects_a_bad_table(tmp_path, clean_table, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        psp_kernels.load_dispatch_table(path)
    assert dispatch._choices == {}


def test_print_dispatch_lists_every_op_and_device():
    result = subprocess.run([sys.executable, "-c", "import psp_kernels; psp_kernels.print_dispatch()"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for op in KERNEL_TABLE:
        rows = [line.split() for line in lines if line.split()[:1] == [op]]
        assert [r[1] for r in rows] == ["cpu", "cuda"], op
        assert rows[0][2] == KERNEL_TABLE[op][0][0], (op, rows[0])     # the library is built: the first candidate
    assert lines[-1] == "autotune: off"


# --------------------------------------------------------------------------------------------------
# Loading the compiled kernels
# --------------------------------------------------------------------------------------------------

def test_without_the_library_the_package_warns_once_and_runs_the_reference():
    """A copy of the package without its built library (and no JIT build): it imports with one warning,
    the CPU kernels are the reference, and the results are the same."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "psp_kernels", Path(tmp) / "psp_kernels",
                        ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
        code = ("import warnings, torch\nwarnings.simplefilter('always')\n"
                "with warnings.catch_warnings(record=True) as caught:\n"
                "    import psp_kernels\n"
                "    from psp_kernels import dispatch\n"
                "    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)\n"
                "    y = psp_kernels.multibin_avg_pool(x)\n"
                "print('WARNINGS', sum('is not built' in str(w.message) for w in caught))\n"
                "print('DEFAULT', dispatch.available('multibin_avg_pool', 'cpu')[0])\n"
                "print('EQUAL', torch.equal(y, psp_kernels.reference.multibin_avg_pool(x, (1, 2, 3, 6))))\n"
                "try:\n    psp_kernels.set_backend('cpp', 'cpu')\nexcept RuntimeError as e:\n    print('ERROR', e)\n")
        env = {**os.environ, "PSP_KERNELS_NO_JIT": "1", "PYTHONPATH": tmp}
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=300,
                                env=env)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in out and "DEFAULT reference" in out and "EQUAL True" in out, out
    assert "ERROR backend 'cpp' cannot run on cpu here: the C++ extension is not built" in out, out


def test_backend_from_the_environment():
    code = "import psp_kernels; print(psp_kernels.get_backend('cpu'), psp_kernels.get_backend('cuda'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PSP_KERNELS_BACKEND": "reference"}).stdout
    assert out.split() == ["reference", "reference"]


def test_cuda_router_enters_the_tensors_device(monkeypatch):
    """Every CUDA kernel of every op runs inside ``torch.cuda.device(<the first tensor's device>)``, so Triton
    launches, CUDA events and the current stream belong to the tensors' GPU and not to the current one
    (checked without a GPU: the device context and the candidate are recorded)."""
    entered, ran = [], []

    class Enter:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Enter)
    monkeypatch.setattr(dispatch, "_run", lambda name, device, tensor, args: ran.append((name, entered[-1:])))
    x = torch.empty(2, 3, device="meta")
    for op in sorted(KERNEL_TABLE):
        entered.clear()
        dispatch._router(op, "cuda")(1, x)
        assert entered == [x.device, "exit"] and ran[-1] == (op, [x.device]), op
    entered.clear()
    dispatch._router("multibin_avg_pool", "cpu")(x)
    assert entered == [] and ran[-1] == ("multibin_avg_pool", [])


def test_weights_on_another_device_than_x_are_named():
    x = torch.randn(1, 8, 6, 6)
    weights = [torch.randn(2, 8, 1, 1, device="meta") for _ in range(4)]
    vectors = [torch.randn(2) for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"conv_weights\[0\] is on meta but the input is on cpu"):
        psp_kernels.pyramid_pooling(x, weights, vectors, vectors, vectors, vectors)
