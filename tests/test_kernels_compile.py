"""Compile-only checks of the GPU kernels, run without a GPU: what a CUDA build and a GPU launch would see.

- CUDA C++: every ``csrc/cuda/*.cu`` compiles with nvcc for sm_90 against torch's and CUTLASS's headers with
  the flags ``setup.py`` builds with (a CUDA error fails CI); its PTX has no atomic instruction (the kernels
  are atomic-free by design); ptxas (``-Xptxas -v``) reports no register spill in any kernel; every kernel a
  ``.cu`` registers (``TORCH_LIBRARY_IMPL(psp_native, CUDA, m)``) is an op of the kernel table with a ``cuda``
  candidate, and is defined by that object file. Skipped only when nvcc is not found.
- Triton: every kernel in ``psp_kernels.triton.KERNELS`` compiles for sm_80 and sm_90 with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every config its launcher can
  pick, within the shared-memory limit, with the specialisation a real launch of that config gets (per config
  and layout the least specialised launch at the benchmark shapes, N=1/8/16 at 60x60 and 90x90, and N=8 at
  61x61: ``bench/gpu_resources.py``, 16-byte aligned pointers and ints divisible by 16 as
  ``tt.divisibility=16``, ints equal to 1 as constants; the binary the JIT would build, not a generic one).
  Those binaries meet the resource budgets: no register spills, 25 % occupancy for the memory-bound passes,
  tensor-core instructions in the GEMM kernels' 16-bit and TF32 dots (registers and spills read with the
  ptxas Triton bundles, run as Triton runs it). Every launch at full size (N=16, C=2048, 90x90 and others, on
  meta tensors with the kernels stubbed) is within CUDA's grid limits and uses a config that is compiled.
  In interpreter mode ``@triton.jit`` yields interpreter objects that cannot be compiled, so the compiles
  run in two background subprocesses without ``TRITON_INTERPRET``, started by the module's first test.
- C++ CPU: every kernel a ``csrc/cpu/*.cpp`` registers is an op of the kernel table with a ``cpp``
  candidate, and is registered in this process (the dispatcher checked its signature against the schema
  when the library loaded).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from psp_kernels import triton as tri
from psp_kernels.dispatch import KERNEL_TABLE

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(p.name for p in (CSRC / "cuda").glob("*.cu"))
CPU_SOURCES = sorted(p.name for p in (CSRC / "cpu").glob("*.cpp"))
IMPL = re.compile(r'm\.impl\("(\w+)",\s*&psp::(cpu|cuda)::(\w+)\)')
ISA_IMPL = re.compile(r'PSP_CPU_IMPL\(m,\s*(\w+)\)')   # csrc/cpu/isa.h: registers psp::cpu::<isa>::op as op


def registered(path: Path) -> list[tuple[str, str]]:
    """(op, C++ function) pairs a source file registers with TORCH_LIBRARY_IMPL."""
    text = path.read_text()
    return [(op, fn) for op, _, fn in IMPL.findall(text)] + [(op, op) for op in ISA_IMPL.findall(text)]


# --------------------------------------------------------------------------------------------------
# Triton: background compile job (started first so it overlaps the other tests of this module)
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys
import torch
from psp_kernels.triton import KERNELS
sys.path.insert(0, "bench")
import gpu_resources
shard, nshards = int(sys.argv[1]), int(sys.argv[2])
# per (config, layout), the least specialised launch at the benchmark shapes (and 61x61, the general pooling
# path): the fewest aligned / divisible / constant arguments; a config no launch uses is compiled generic
launched = {}
for spec in gpu_resources.collect(shapes=gpu_resources.SHAPES + ((8, 61),),
                                  dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    key = (spec["kernel"], spec["config"], spec["launches"][0].split()[1])
    rank = len(spec["attrs"]) + len(spec["constexprs"])
    if key not in launched or rank < launched[key][0]:
        launched[key] = (rank, spec)
items = []
for e in KERNELS:
    for c in e.configs:
        specs = [s for (k, name, _), (_, s) in sorted(launched.items()) if (k, name) == (e.name, c.name)]
        generic = dict(kernel=e.name, config=c.name, signature=c.signature, constexprs=c.constexprs, attrs={},
                       launches=[])
        items += [(s, cc) for s in (specs or [generic]) for cc in (80, 90)]
out = [gpu_resources.compile_one(spec, cc) for i, (spec, cc) in enumerate(items) if i % nshards == shard]
sys.stdout.write("\n@@RESULTS@@" + json.dumps(out))
"""


class _CompileJob:
    """Background compile of the whole registry in ``nshards`` subprocesses (no interpreter)."""

    def __init__(self, nshards=2):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, str(i), str(nshards)],
                                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for i in range(nshards)]
        self._results = None

    def results(self):
        if self._results is None:
            res = []
            for p in self.procs:
                out, err = p.communicate(timeout=2400)
                assert p.returncode == 0 and "@@RESULTS@@" in out, f"compile worker failed:\n{err[-4000:]}"
                res += json.loads(out.split("@@RESULTS@@", 1)[1])
            self._results = res
        return self._results

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="module")
def compile_job():
    job = _CompileJob()
    yield job
    job.kill()


def test_start_compile_job(compile_job):
    """Starts the background compiles (asserted in test_triton_compiles at the end of the module)."""
    assert all(p.pid for p in compile_job.procs)


# --------------------------------------------------------------------------------------------------
# CUDA C++: nvcc
# --------------------------------------------------------------------------------------------------

def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def setup_nvcc_flags() -> list[str]:
    """``NVCC_FLAGS`` of setup.py (read from its source: importing setup.py would run setup())."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no NVCC_FLAGS")


def cutlass_include() -> str:
    """CUTLASS's include folder from the pinned nvidia-cutlass package (installed by scripts/run.sh)."""
    import cutlass_library
    return str(Path(cutlass_library.__file__).parent / "source" / "include")


def torch_flags() -> list[str]:
    """Defines and include paths torch.utils.cpp_extension compiles an extension with."""
    paths = cpp_extension.include_paths()
    flags = ["-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *(f"-I{p}" for p in paths)]
    # torch's CPU wheels ship the c10/cuda headers without the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS, used on Windows);
    # c10/cuda/CUDAMacros.h skips it under this define.
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in paths):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def compile_commands(nvcc: str, out: Path) -> dict[str, list[str]]:
    """One command per csrc/cuda/*.cu: nvcc -c for sm_90, PTX kept, ptxas's resource report (``-v``) on stderr."""
    nvcc_flags = [f for f in setup_nvcc_flags() if not f.startswith("-gencode")]
    cmds = {}
    for src in CUDA_SOURCES:
        keep = out / Path(src).stem
        keep.mkdir()
        cmds[src] = [nvcc, "-c", str(CSRC / "cuda" / src), "-o", str(out / f"{src}.o"),
                     "-gencode=arch=compute_90,code=sm_90", "-keep", f"-keep-dir={keep}", "-Xptxas", "-v",
                     *cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", *nvcc_flags, *torch_flags(),
                     f"-I{cutlass_include()}"]
    return cmds


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs every nvcc compile once, in parallel; returns (output dir, {source: CompletedProcess})."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, nor under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda)")
    out = tmp_path_factory.mktemp("cuda_build")
    cmds = compile_commands(nvcc, out)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        runs = dict(zip(cmds, pool.map(
            lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=900), cmds.values())))
    return out, runs


def assert_built(compiled, src):
    run = compiled[1][src]
    assert run.returncode == 0, f"{src} failed to compile:\n{' '.join(run.args)}\n{run.stderr[-6000:]}"


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_compiles(compiled, src):
    assert_built(compiled, src)


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_ptx_has_no_atomics(compiled, src):
    assert_built(compiled, src)
    ptx = list((compiled[0] / Path(src).stem).glob("*.ptx"))
    assert ptx, f"nvcc -keep left no PTX for {src}"
    atomics = [m.group(0) for p in ptx for m in re.finditer(r"^\s*(?:atom|red)\.\S+", p.read_text(), re.M)]
    assert not atomics, f"{src}: atomic instructions {atomics[:5]}"


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_kernels_do_not_spill(compiled, src):
    """The resource budget of the CUDA C++ (``nvcc -Xptxas -v``, sm_90): no fp32 / fp16 / bf16 kernel spills
    registers (fp64 instantiations, mangled ``...kernelIdE...``, are an exactness path, as in the Triton
    budgets)."""
    assert_built(compiled, src)
    report = compiled[1][src].stderr
    entries = re.split(r"Compiling entry function '", report)[1:]
    assert entries, f"{src}: no ptxas resource report\n{report[-2000:]}"
    spills = {}
    for entry in entries:
        name, found = entry.split("'", 1)[0], re.search(r"(\d+) bytes spill stores", entry)
        assert found, f"{src}: no spill count for {name}"
        if int(found.group(1)) and not re.search(r"kernelIdE", name):
            spills[name] = int(found.group(1))
    assert not spills, f"{src}: spill stores (bytes per thread) {spills}"


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_registrations_are_table_ops_defined_by_the_object(compiled, src):
    """Every kernel the .cu registers is an op whose CUDA candidates include ``cuda``, and the object file
    defines the registered function (the dispatcher checks its signature against the schema when a CUDA
    build loads; here, without a GPU, the compile and the names are checked)."""
    assert_built(compiled, src)
    pairs = registered(CSRC / "cuda" / src)
    assert pairs, f"{src} registers no kernel"
    for op, _ in pairs:
        assert op in KERNEL_TABLE and "cuda" in KERNEL_TABLE[op][1], (src, op)
    if shutil.which("nm") is None:
        return
    nm = subprocess.run(["nm", "-C", "--defined-only", str(compiled[0] / f"{src}.o")], capture_output=True, text=True,
                        check=True).stdout
    defined = set(re.findall(r"\bpsp::cuda::(\w+)\(", nm))
    assert {fn for _, fn in pairs} <= defined, (src, sorted(defined))


def test_every_cuda_candidate_has_a_registration():
    """The table's ``cuda`` candidates are exactly the ops the .cu files register."""
    registered_ops = {op for src in CUDA_SOURCES for op, _ in registered(CSRC / "cuda" / src)}
    table_ops = {op for op, (_, cuda) in KERNEL_TABLE.items() if "cuda" in cuda}
    assert registered_ops == table_ops


# --------------------------------------------------------------------------------------------------
# C++ CPU: registrations
# --------------------------------------------------------------------------------------------------

def test_every_cpp_candidate_is_registered():
    """The table's ``cpp`` candidates are exactly the ops the .cpp files register, and each has a CPU kernel
    in this process (the library loaded, its kernels checked against the schemas)."""
    registered_ops = {op for src in CPU_SOURCES for op, _ in registered(CSRC / "cpu" / src)}
    table_ops = {op for op, (cpu, _) in KERNEL_TABLE.items() if "cpp" in cpu}
    assert registered_ops == table_ops
    for op in table_ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"psp_native::{op}", "CPU"), op


# --------------------------------------------------------------------------------------------------
# Triton: the kernel registry and the launch geometry at full size
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resources(load_bench):
    """``bench/gpu_resources.py``: the kernel list per module, the launch recorder and the launch driver."""
    return load_bench("gpu_resources")


def test_triton_registry_lists_every_kernel(resources):
    import triton

    registered_names = {e.name for e in tri.KERNELS}
    for module, names in resources.MODULE_KERNELS.items():
        found = {k for k, v in vars(module).items() if k.endswith("_kernel")
                 and isinstance(v, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction))}
        assert found == set(names) and found <= registered_names, (module.__name__, found, registered_names)
    for e in tri.KERNELS:
        dts = {v for c in e.configs for k, v in c.signature.items() if k.endswith("_ptr")}
        # Kernels reading activations have fp16 and bf16 configs; the ones that only merge accumulation-
        # dtype partials (the head's statistics) have fp32 and fp64 ones. Every kernel has fp32.
        assert {"*fp16", "*bf16"} <= dts or (dts & {"*fp16", "*bf16"} == set() and "*fp64" in dts), e.name
        assert any("*fp32" in c.signature.values() for c in e.configs), e.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,hw", [(16, 90), (1, 60), (8, 61)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_triton_full_size_launch_geometry(resources, dtype, n, hw, channels_last):
    """N=16, C=2048, R=512 at 90x90 (and N=1 at 60x60, N=8 at 61x61) on meta tensors with the kernels
    stubbed (``gpu_resources.drive_launchers``): every grid is within CUDA limits and every launch uses a
    config the compile test builds."""
    with resources.recording() as calls:
        resources.drive_launchers(dtype, n, hw, channels_last)

    nested = {"_pool_nested_fwd_kernel", "_pool_nested_bwd_kernel"}     # 60, 90: nested; 61: general path
    expected = {k for v in resources.MODULE_KERNELS.values() for k in v} - (
        nested if hw % 6 else {"_pool_fwd_kernel", "_pool_bwd_kernel"})
    assert {name for name, *_ in calls} == expected
    entries = {e.name: e for e in tri.KERNELS}
    for name, grid, args, kw in calls:
        assert 1 <= grid[0] < 2 ** 31 and all(1 <= g < 65536 for g in grid[1:]), (name, grid)
        assert resources.launch_config(entries[name], args, kw) is not None, (name, kw)


# --------------------------------------------------------------------------------------------------
# Triton: compile for sm80 / sm90 (results of the background job)
# --------------------------------------------------------------------------------------------------

_SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("kernel", [e.name for e in tri.KERNELS])
def test_triton_compiles(compile_job, kernel, cc):
    entry = next(e for e in tri.KERNELS if e.name == kernel)
    rows = [r for r in compile_job.results() if r["kernel"] == kernel and r["cc"] == cc]
    assert {r["config"] for r in rows} == {c.name for c in entry.configs}
    assert any(r["launches"] for r in rows), f"{kernel}: no config compiled as launched"
    errors = {r["config"]: r["error"] for r in rows if "error" in r}
    assert not errors, "\n\n".join(f"{k}:\n{v}" for k, v in errors.items())
    over = {r["config"]: r["shared_bytes"] for r in rows if r["shared_bytes"] > _SHARED_LIMIT[cc]}
    assert not over, f"static shared memory over the sm_{cc} limit: {over}"


#: kernels whose 16-bit dots are GEMMs that must run on tensor cores (mma.sync / wgmma in the PTX); an fp32 dot
#: that runs in TF32 (``DOT_PRECISION="tf32"``, see ``conv_dot_precision``) must too
TENSOR_CORE_KERNELS = ("_conv_fwd_kernel", "_reduction_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel")
MIN_MEMORY_BOUND_OCCUPANCY = 0.25


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("kernel", [e.name for e in tri.KERNELS])
def test_triton_resource_budgets(compile_job, kernel, cc):
    """The budgets of the binaries a GPU would run: every launched fp32 / fp16 / bf16 specialisation of the
    job above (per config and layout the least specialised one at the benchmark shapes; the full table of
    every specialisation is ``python bench/gpu_resources.py``) has no register spills, the memory-bound
    passes (``gpu_resources.MEMORY_BOUND``) reach 25 % occupancy, and the GEMM kernels' 16-bit and TF32
    dots use tensor-core instructions. fp64 is an exactness path, not a performance one: not budgeted."""
    rows = [r for r in compile_job.results() if r["kernel"] == kernel and r["cc"] == cc and r["launches"]
            and "error" not in r and "/fp64" not in r["config"]]
    where = [f"{r['config']} [{r['launches'][0]}]" for r in rows]
    spills = [f"{w}: {r['spill_store_bytes']} B" for w, r in zip(where, rows) if r["spill_store_bytes"]]
    low = [f"{w}: {100 * r['occupancy']:.1f} % ({r['registers']} registers)" for w, r in zip(where, rows)
           if r["memory_bound"] and r["occupancy"] < MIN_MEMORY_BOUND_OCCUPANCY]
    no_mma = [w for w, r in zip(where, rows) if kernel in TENSOR_CORE_KERNELS and r["mma"] + r["wgmma"] == 0
              and (r["tf32"] or "/bf16" in r["config"] or "/fp16" in r["config"])]
    assert not spills, f"sm_{cc} register spills (bytes per thread): {spills}"
    assert not low, f"sm_{cc} memory-bound occupancy under {MIN_MEMORY_BOUND_OCCUPANCY:.0%}: {low}"
    assert not no_mma, f"sm_{cc} dots without tensor-core instructions: {no_mma}"
