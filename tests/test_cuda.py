"""The CUDA backend (``csrc/cuda/*.cu``, bound as ``psp_kernels._C.cuda``) against ``psp_kernels.reference``.

Two parts:

- Compile check, no GPU needed (CI has none): every ``csrc/cuda/*.cu`` compiles with nvcc for sm_90
  against torch's headers with the flags ``setup.py`` builds with, so a CUDA error fails CI; its PTX
  has no atomic instruction (the kernels are atomic-free by design); and ``csrc/bindings.cpp`` compiled
  with ``-DPSP_WITH_CUDA`` references exactly the ``psp::cuda`` functions the .cu objects define
  (declarations, definitions and bindings agree: what the link of a CUDA build checks). The compiles
  run in parallel. Skipped only when nvcc is not found.
- On a CUDA GPU (skipped without one): each of the nine functions against the reference evaluated in
  float64 on the same inputs (float64 to 1e-12, float32 to 1e-5, float16/bfloat16 to a few ulps,
  normwise, as ``tests/test_cpp.py``); shapes 13x17, 5x4 (H, W smaller than bin 6), 60x60 with N=1
  (the nested bins 1, 2, 3, 6), 12x12 with bins (1, 3, 5); NCHW, channels_last, non-contiguous x and
  channel-slice residuals; train and eval; bitwise determinism; pooling bitwise equal to the CPU
  backend (same summation order); NaN through the ReLU; the N=1 eval forward (pool_concat_forward +
  project_forward + upsample_into) in at most 4 kernel launches with no host-to-device copy, and
  replayable as a CUDA graph.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from psp_kernels import reference as ref
from psp_kernels.geometry import packed_size
from test_cpp import (DTYPE_PAIR_IDS, DTYPE_PAIRS, DTYPES, EPS, acc_of, assert_close, bn_params, check_project_backward,
                      f64, is_nhwc, rand)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(p.name for p in (CSRC / "cuda").glob("*.cu"))
FUNCTIONS = ("pool_forward", "pool_backward", "project_forward", "project_backward", "upsample_forward",
             "upsample_backward", "pool_concat_forward", "upsample_into", "pool_backward_add", "conv_bias_act")


# ---------------------------------------------------------------------------------------------
# Compile check (no GPU)
# ---------------------------------------------------------------------------------------------

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
    """One command per csrc/cuda/*.cu (nvcc -c for sm_90, PTX kept) and for csrc/bindings.cpp (host c++)."""
    nvcc_flags = [f for f in setup_nvcc_flags() if not f.startswith("-gencode")]
    cmds = {}
    for src in CUDA_SOURCES:
        keep = out / Path(src).stem
        keep.mkdir()
        cmds[src] = [nvcc, "-c", str(CSRC / "cuda" / src), "-o", str(out / f"{src}.o"),
                     "-gencode=arch=compute_90,code=sm_90", "-keep", f"-keep-dir={keep}",
                     *cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", *nvcc_flags, *torch_flags(),
                     f"-I{cutlass_include()}"]
    cmds["bindings.cpp"] = [os.environ.get("CXX", "c++"), "-c", "-O0", "-fPIC", "-DPSP_WITH_CUDA", *torch_flags(),
                            f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp"),
                            "-o", str(out / "bindings.cpp.o")]
    return cmds


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs every compile once, in parallel; returns (output dir, {source: CompletedProcess})."""
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


@pytest.mark.parametrize("src", CUDA_SOURCES + ["bindings.cpp"])
def test_compiles(compiled, src):
    assert_built(compiled, src)


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_ptx_has_no_atomics(compiled, src):
    assert_built(compiled, src)
    ptx = list((compiled[0] / Path(src).stem).glob("*.ptx"))
    assert ptx, f"nvcc -keep left no PTX for {src}"
    atomics = [m.group(0) for p in ptx for m in re.finditer(r"^\s*(?:atom|red)\.\S+", p.read_text(), re.M)]
    assert not atomics, f"{src}: atomic instructions {atomics[:5]}"


def psp_cuda_symbols(obj: Path, defined: bool) -> set[str]:
    """Demangled signatures of the psp::cuda functions an object file defines (or references)."""
    nm = subprocess.run(["nm", "-C", "--defined-only" if defined else "--undefined-only", str(obj)],
                        capture_output=True, text=True, check=True).stdout
    return {m.group(1) for m in re.finditer(r"\b(psp::cuda::[a-z_]+\(.*\))\s*$", nm, re.M)}


def test_bindings_match_cuda_definitions(compiled):
    """Every psp::cuda function bindings.cpp binds is defined, with the same signature, by a .cu object."""
    for src in CUDA_SOURCES + ["bindings.cpp"]:
        assert_built(compiled, src)
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not found")
    out = compiled[0]
    used = psp_cuda_symbols(out / "bindings.cpp.o", defined=False)
    defined = set().union(*(psp_cuda_symbols(out / f"{src}.o", defined=True) for src in CUDA_SOURCES))
    assert {re.match(r"psp::cuda::(\w+)\(", s).group(1) for s in used} == set(FUNCTIONS), used
    assert used <= defined, f"bound but not defined (signature mismatch?): {sorted(used - defined)}"


# ---------------------------------------------------------------------------------------------
# GPU: helpers
# ---------------------------------------------------------------------------------------------

DEV = "cuda"
# (shape of x, bins): overlapping windows; H, W < 6; the nested bins at 60x60 with N=1; bins (1, 3, 5).
CASES = [((2, 5, 13, 17), (1, 2, 3, 6)), ((1, 3, 5, 4), (1, 2, 3, 6)), ((1, 8, 60, 60), (1, 2, 3, 6)),
         ((2, 4, 12, 12), (1, 3, 5))]
CASE_IDS = ["13x17", "5x4", "60x60-N1", "12x12-b135"]
LAYOUTS = ["nchw", "channels_last", "strided"]
R = 3


@pytest.fixture(scope="module")
def cu():
    """psp_kernels._C.cuda; skipped without a GPU, a failure when a GPU is present but it is missing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from psp_kernels._extension import load_extension
    ext = load_extension()
    assert ext is not None and hasattr(ext, "cuda"), (
        "a CUDA GPU is present but psp_kernels._C has no `cuda` submodule: build the extension with a CUDA "
        "torch (`pip install --no-build-isolation -e .`)")
    return ext.cuda


def make_x(shape, dtype, layout, seed=0):
    """x on the GPU as 'nchw', 'channels_last' or 'strided' (every other channel of a wider tensor)."""
    n, c, h, w = shape
    if layout == "strided":
        return rand(n, 2 * c, h, w, dtype=dtype, seed=seed).to(DEV)[:, ::2]
    x = rand(*shape, dtype=dtype, seed=seed).to(DEV)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_params(c, r, bins, dtype, seed=1):
    return [[t.to(DEV) for t in group] for group in bn_params(c, r, bins, dtype, seed)]


def fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# GPU: interface and pooling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_names_and_arguments_as_reference(cu, name):
    params = list(inspect.signature(getattr(ref, name)).parameters)
    doc = getattr(cu, name).__doc__
    assert f"{name}({params[0]}:" in doc and all(f"{p}:" in doc for p in params), doc


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_forward(cu, dtype, shape, bins, layout):
    x = make_x(shape, dtype, layout)
    got = cu.pool_forward(x, bins)
    assert got.dtype == dtype and got.is_cuda and got.is_contiguous()
    assert_close(got, ref.pool_forward(x.double(), bins), dtype, "pool_forward")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_concat_forward(cu, dtype, shape, bins, layout):
    x = make_x(shape, dtype, layout)
    total = shape[1] + 2 * len(bins)
    pooled, concat = cu.pool_concat_forward(x, bins, total)
    assert torch.equal(pooled, cu.pool_forward(x, bins)), "pooled must not depend on the fused copy"
    assert concat.shape == (shape[0], total, *shape[2:]) and concat.dtype == dtype
    assert is_nhwc(concat) == (layout == "channels_last") and (is_nhwc(concat) or concat.is_contiguous())
    assert torch.equal(concat[:, :shape[1]], x), "x's channels must be copied exactly"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_backward(cu, dtype, shape, bins, channels_last):
    n, c, h, w = shape
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=3).to(DEV)
    got = cu.pool_backward(g, bins, h, w, channels_last)
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous(memory_format=fmt(channels_last))
    assert_close(got, ref.pool_backward(g.double(), bins, h, w, channels_last), dtype, "pool_backward")


@pytest.mark.parametrize("residual_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_backward_add(cu, dtype, shape, bins, channels_last, residual_layout):
    """The residual is a channel slice of a wider gradient (a view with its parent's strides)."""
    n, c, h, w = shape
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=3).to(DEV)
    residual = make_x((n, c + 6, h, w), dtype, residual_layout, seed=5)[:, 2:2 + c]
    got = cu.pool_backward_add(g, bins, residual, channels_last)
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous(memory_format=fmt(channels_last))
    expected = ref.pool_backward_add(g.double(), bins, residual.double(), channels_last)
    assert_close(got, expected, dtype, "pool_backward_add")


# ---------------------------------------------------------------------------------------------
# GPU: projection
# ---------------------------------------------------------------------------------------------

def check_project(cu, dtype, param_dtype, shape, bins, training, r, check_backward=True):
    n, c = shape[:2]
    pooled = rand(n, c, packed_size(bins), dtype=dtype, seed=5).to(DEV)
    params = make_params(c, r, bins, param_dtype)
    out, z, mean, var = cu.project_forward(pooled, *params, bins, training, EPS)
    e_out, e_z, e_mean, e_var = ref.project_forward(pooled.double(), *map(f64, params), bins, training, EPS)
    acc = acc_of(dtype)
    assert out.dtype == dtype and (z.dtype, mean.dtype, var.dtype) == (acc, acc, acc)
    assert out.is_contiguous() and z.is_contiguous() and mean.shape == var.shape == (len(bins), r)
    assert_close(z, e_z, acc, "z")
    assert_close(mean, e_mean, acc, "mean")
    assert_close(var, e_var, acc, "var")
    assert_close(out, e_out, dtype, "out")
    if not check_backward:
        return
    check_project_backward(cu, pooled, z, mean, var, *params[:3], bins, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_project(cu, dtype, param_dtype, shape, bins, training):
    check_project(cu, dtype, param_dtype, shape, bins, training, R)


@pytest.mark.parametrize("dtype,param_dtype,training", [
    (torch.float64, torch.float64, True), (torch.float64, torch.float64, False),
    (torch.float32, torch.float32, False), (torch.bfloat16, torch.float32, False)])
def test_project_many_tiles(cu, dtype, param_dtype, training):
    """C = 70, R = 67: several K steps and ragged row/channel tiles of the GEMMs. (fp32 training is left
    to the small cases: a bin of N*b*b = 2 values amplifies z's rounding beyond 1e-5 in any backend.)"""
    check_project(cu, dtype, param_dtype, (2, 70, 13, 17), (1, 2, 3, 6), training, 67)


def test_project_relu_propagates_nan(cu):
    bins = (1, 2, 3, 6)
    pooled = rand(2, 4, packed_size(bins), dtype=torch.float32, seed=5).to(DEV)
    pooled[0, 1, 3] = float("nan")
    params = make_params(4, R, bins, torch.float32)
    out = cu.project_forward(pooled, *params, bins, False, EPS)[0]
    expected = ref.project_forward(pooled.double(), *map(f64, params), bins, False, EPS)[0]
    assert out.isnan().any() and torch.equal(out.isnan(), expected.isnan())


# ---------------------------------------------------------------------------------------------
# GPU: upsampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_forward(cu, dtype, shape, bins, layout):
    x = make_x(shape, dtype, layout)
    branches = rand(shape[0], R, packed_size(bins), dtype=dtype, seed=9).to(DEV)
    got = cu.upsample_forward(x, branches, bins)
    assert got.dtype == dtype and got.shape == (shape[0], shape[1] + R * len(bins), *shape[2:])
    assert is_nhwc(got) == (layout == "channels_last") and (is_nhwc(got) or got.is_contiguous())
    assert torch.equal(got[:, :shape[1]], x), "x's channels must be copied exactly"
    assert_close(got, ref.upsample_forward(x.double(), branches.double(), bins), dtype, "upsample_forward")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_into(cu, dtype, shape, bins, layout):
    n, c, h, w = shape
    concat = torch.full((n, c + R * len(bins), h, w), 7.0, dtype=dtype, device=DEV).contiguous(
        memory_format=fmt(layout == "channels_last"))
    branches = rand(n, R, packed_size(bins), dtype=dtype, seed=9).to(DEV)
    assert cu.upsample_into(concat, branches, bins, c) is None
    assert (concat[:, :c] == 7).all(), "the pass-through channels must not be written"
    expected = torch.zeros(concat.shape, dtype=torch.float64, device=DEV)
    ref.upsample_into(expected, branches.double(), bins, c)
    assert_close(concat[:, c:], expected[:, c:], dtype, "upsample_into")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_backward(cu, dtype, shape, bins, layout):
    n, c, h, w = shape
    grad_out = make_x((n, c + R * len(bins), h, w), dtype, layout, seed=11)
    got = cu.upsample_backward(grad_out, bins, c)
    assert got.dtype == dtype and got.shape == (n, R, packed_size(bins)) and got.is_contiguous()
    assert_close(got, ref.upsample_backward(grad_out.double(), bins, c), dtype, "upsample_backward")


# ---------------------------------------------------------------------------------------------
# GPU: determinism, agreement with the CPU backend, launches
# ---------------------------------------------------------------------------------------------

def run_all(cu, dtype, layout, training=True):
    """Every function once on one fixed problem; flat list of results."""
    bins, r = (1, 2, 3, 6), 96
    x = make_x((2, 64, 37, 45), dtype, layout, seed=13)
    n, c, h, w = x.shape
    pooled, concat = cu.pool_concat_forward(x, bins, c + r * len(bins))
    params = make_params(c, r, bins, acc_of(dtype), seed=17)
    out, z, mean, var = cu.project_forward(pooled, *params, bins, training, EPS)
    cu.upsample_into(concat, out, bins, c)
    grad_out = rand(n, r, packed_size(bins), dtype=dtype, seed=19).to(DEV)
    gp, gw, gg, gb = cu.project_backward(grad_out, pooled, z, *params[:3], mean, var, bins, training, EPS)
    g_concat = make_x(tuple(concat.shape), dtype, layout, seed=23)
    gu = cu.upsample_backward(g_concat, bins, c)
    gx = cu.pool_backward_add(gp, bins, g_concat[:, :c], layout == "channels_last")
    return [cu.pool_forward(x, bins), pooled, concat, out, z, mean, var, gp, *gw, *gg, *gb,
            cu.upsample_forward(x, out, bins), gu, cu.pool_backward(gp, bins, h, w, False), gx]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(cu, dtype, layout, training):
    first = run_all(cu, dtype, layout, training)
    second = run_all(cu, dtype, layout, training)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"result {i} differs between two runs"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_pooling_bitwise_equal_to_cpu_backend(cu, dtype, layout):
    """The pooling kernels sum in csrc/cpu/pooling.cpp's order (adds and one division, no FMA)."""
    from psp_kernels._extension import load_extension
    cpu = load_extension()
    bins = (1, 2, 3, 6)
    x = make_x((2, 70, 13, 17), dtype, layout)
    assert torch.equal(cu.pool_forward(x, bins).cpu(), cpu.pool_forward(x.cpu(), bins))
    g = rand(2, 70, packed_size(bins), dtype=dtype, seed=4)
    cl = layout == "channels_last"
    assert torch.equal(cu.pool_backward(g.to(DEV), bins, 13, 17, cl).cpu(), cpu.pool_backward(g, bins, 13, 17, cl))


def eval_forward(cu, x, params, bins):
    """The fused PPM forward in eval mode: concat [N, C + nb*R, H, W]."""
    c, r = x.shape[1], params[0][0].shape[0]
    pooled, concat = cu.pool_concat_forward(x, bins, c + r * len(bins))
    out = cu.project_forward(pooled, *params, bins, False, EPS)[0]
    cu.upsample_into(concat, out, bins, c)
    return concat


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_forward_at_most_4_launches(cu, layout):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    bins = (1, 2, 3, 6)
    x = make_x((1, 256, 60, 60), torch.bfloat16, layout)
    params = make_params(256, 64, bins, torch.float32)
    eval_forward(cu, x, params, bins)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = eval_forward(cu, x, params, bins)
        torch.cuda.synchronize()
    device_events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = [name for name in device_events if not name.startswith(("Memcpy", "Memset"))]
    copies = [name for name in device_events if name.startswith("Memcpy")]
    assert 1 <= len(kernels) <= 4, kernels
    assert not copies, copies
    expected = ref.SemsegPPM(256, 64, bins).to(DEV).double().eval()
    for k, f in enumerate(expected.features):
        f[1].weight.data.copy_(params[0][k])
        f[2].weight.data.copy_(params[1][k])
        f[2].bias.data.copy_(params[2][k])
        f[2].running_mean.copy_(params[3][k])
        f[2].running_var.copy_(params[4][k])
    with torch.no_grad():
        assert_close(got, expected(x.double()), torch.bfloat16, "eval forward")


def test_eval_forward_cuda_graph(cu):
    bins = (1, 2, 3, 6)
    x = make_x((1, 32, 60, 60), torch.float32, "channels_last")
    params = make_params(32, 16, bins, torch.float32)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eval_forward(cu, static_x, params, bins)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = eval_forward(cu, static_x, params, bins)
    x2 = make_x((1, 32, 60, 60), torch.float32, "channels_last", seed=2)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eval_forward(cu, x2, params, bins))


# ---------------------------------------------------------------------------------------------
# GPU: bad arguments raise (never crash)
# ---------------------------------------------------------------------------------------------

def test_invalid_arguments_raise(cu):
    bins = (1, 2)
    s = packed_size(bins)
    x = rand(1, 2, 5, 5).to(DEV)
    params = make_params(2, 3, bins, torch.float64)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cu.pool_forward(x.cpu(), bins)
    with pytest.raises(RuntimeError, match="bins must not be empty"):
        cu.pool_forward(x, [])
    with pytest.raises(RuntimeError, match="at most 8 bins"):
        cu.pool_forward(x, list(range(1, 10)))
    with pytest.raises(RuntimeError, match="4-D"):
        cu.pool_forward(x[0], bins)
    with pytest.raises(RuntimeError, match="S = sum"):
        cu.pool_backward(rand(1, 2, s + 1).to(DEV), bins, 5, 5, False)
    with pytest.raises(RuntimeError, match="one tensor per bin"):
        cu.project_forward(rand(1, 2, s).to(DEV), params[0][:1], *params[1:], bins, True, EPS)
    with pytest.raises(RuntimeError, match=r"\[R, C, 1, 1\]"):
        cu.project_forward(rand(1, 4, s).to(DEV), *params, bins, True, EPS)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        cu.project_backward(rand(1, 3, s).to(DEV), rand(1, 2, s).to(DEV), rand(1, 3, s, dtype=torch.float32).to(DEV),
                            *params[:3], rand(2, 3).to(DEV), rand(2, 3).abs().to(DEV), bins, True, EPS)
    with pytest.raises(RuntimeError, match="batch"):
        cu.upsample_forward(x, rand(2, 3, s).to(DEV), bins)
    with pytest.raises(RuntimeError, match=r"len\(bins\)"):
        cu.upsample_backward(rand(1, 2 + 5, 5, 5).to(DEV), bins, 2)
    with pytest.raises(RuntimeError, match=r"len\(bins\)"):
        cu.upsample_into(rand(1, 2 + 5, 5, 5).to(DEV), rand(1, 3, s).to(DEV), bins, 2)
    with pytest.raises(RuntimeError, match="residual"):
        cu.pool_backward_add(rand(1, 2, s).to(DEV), bins, rand(1, 3, 5, 5).to(DEV), False)


# ---------------------------------------------------------------------------------------------
# GPU: the CUTLASS backbone convolution
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)],
                         ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_conv_bias_act(cu, dtype, geometry):
    k, stride, padding, dilation = geometry
    cl = torch.channels_last
    x = torch.randn(2, 64, 29, 31, device=DEV, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(72, 64, k, k, device=DEV, dtype=dtype) / (64 * k * k) ** 0.5).contiguous(memory_format=cl)
    b = torch.randn(72, device=DEV)
    ho, wo = ((s + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for s in (29, 31))
    res = torch.randn(2, 72, ho, wo, device=DEV, dtype=dtype).contiguous(memory_format=cl)
    for r, relu in ((res, True), (None, True), (None, False)):
        out = cu.conv_bias_act(x, w, b, r, stride, padding, dilation, relu)
        want = ref.conv_bias_act(x.double(), w.double(), b.double(), None if r is None else r.double(), stride,
                                 padding, dilation, relu)
        eager = ref.conv_bias_act(x, w, b, r, stride, padding, dilation, relu)
        assert out.is_contiguous(memory_format=cl) and out.dtype == dtype
        err = lambda t: ((t.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert err(out) <= 2 * err(eager) + 1e-3
        assert torch.equal(out, cu.conv_bias_act(x, w, b, r, stride, padding, dilation, relu))


def test_conv_bias_act_declines_what_it_does_not_cover(cu):
    x = torch.randn(1, 64, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device=DEV)
    with pytest.raises(NotImplementedError, match="float16/bfloat16"):
        cu.conv_bias_act(x, w, torch.zeros(64, device=DEV), None, 1, 1, 1, True)
    with pytest.raises(NotImplementedError, match="multiples of 8"):
        cu.conv_bias_act(x[:, :3].half().contiguous(memory_format=torch.channels_last), w[:, :3].half(),
                         torch.zeros(64, device=DEV), None, 1, 1, 1, True)
