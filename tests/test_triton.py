"""Triton backend: interpreter parity with ``psp_kernels.reference`` and compile-only checks for sm80/sm90.

Parity tests run the kernels on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1``) and
compare against the reference evaluated in float64 on the same inputs. Tolerances: fp64 1e-12, fp32
1e-5 (relative to the largest reference value), fp16/bf16 one ``finfo.eps`` relative (the kernels
accumulate in fp32 and round once, i.e. at most half an ulp plus fp32 noise).

Compile tests build every kernel in ``psp_kernels.triton.KERNELS`` for every registered config with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. In interpreter mode ``@triton.jit``
yields interpreter objects that cannot be compiled, so the compiles run in two background subprocesses
without ``TRITON_INTERPRET``, started by the first test of this module and overlapping the parity tests.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from psp_kernels import reference as ref  # noqa: E402
from psp_kernels import triton as tri  # noqa: E402
from psp_kernels.geometry import packed_size  # noqa: E402
from psp_kernels.triton import pooling as tpool  # noqa: E402
from psp_kernels.triton.common import SIG_DTYPE  # noqa: E402
from psp_kernels.triton import projection as tproj  # noqa: E402
from psp_kernels.triton import upsample as tup  # noqa: E402
from psp_kernels.triton import head as thead  # noqa: E402
from psp_kernels.triton import conv as tconv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, bins): odd sizes with overlapping windows; a map smaller than the largest bin; non-default bins;
# nesting windows (H, W multiples of 6: the nested pooling path) on a non-square map.
SHAPES = [(2, 5, 13, 17, (1, 2, 3, 6)), (1, 3, 5, 4, (1, 2, 3, 6)), (2, 4, 12, 12, (1, 3, 5)),
          (2, 5, 12, 18, (1, 2, 3, 6))]
R = 4


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v[:4])) + "_b" + "".join(map(str, v[4]))
    return None


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or torch.finfo(dtype).eps


def assert_matches(got, want, dtype, what=""):
    """``got`` (any dtype) against the float64 reference ``want``: rtol = atol/scale = tol(dtype)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    tol = _tol(dtype)
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _x(n, c, h, w, dtype, channels_last):
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _params(r, c, bins, wdtype):
    weights = [(torch.randn(r, c, 1, 1, dtype=torch.float64) / c ** 0.5).to(wdtype) for _ in bins]
    gammas = [(torch.rand(r, dtype=torch.float64) + 0.5).to(wdtype) for _ in bins]
    betas = [torch.randn(r, dtype=torch.float64).to(wdtype) for _ in bins]
    rmeans = [0.1 * torch.randn(r) for _ in bins]
    rvars = [torch.rand(r) + 0.5 for _ in bins]
    return weights, gammas, betas, rmeans, rvars


def _d(ts):
    return [t.double() for t in ts]


# --------------------------------------------------------------------------------------------------
# Compile job (started first so it overlaps the interpreter tests)
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, os, sys, traceback
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from psp_kernels.triton import KERNELS
shard, nshards = int(sys.argv[1]), int(sys.argv[2])
items = [(e, c, cc) for e in KERNELS for c in e.configs for cc in (80, 90)]
out = []
for i, (e, cfg, cc) in enumerate(items):
    if i % nshards != shard:
        continue
    rec = {"kernel": e.name, "config": cfg.name, "cc": cc}
    try:
        k = triton.compile(ASTSource(fn=e.fn, signature=cfg.signature, constexprs=cfg.constexprs),
                           target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.options))
        rec["shared"] = int(k.metadata.shared)
    except Exception:
        rec["error"] = traceback.format_exc()[-3000:]
    out.append(rec)
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
                out, err = p.communicate(timeout=900)
                assert p.returncode == 0 and "@@RESULTS@@" in out, f"compile worker failed:\n{err[-4000:]}"
                res += json.loads(out.split("@@RESULTS@@", 1)[1])
            self._results = res
        return self._results

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="session")
def compile_job():
    job = _CompileJob()
    yield job
    job.kill()


def test_start_compile_job(compile_job):
    """Starts the background compiles (asserted in the test_compile_* tests at the end of the module)."""
    assert all(p.pid for p in compile_job.procs)


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_pool(dtype, shape, channels_last):
    n, c, h, w, bins = shape
    x = _x(n, c, h, w, dtype, channels_last)
    pooled = tri.pool_forward(x, bins)
    assert pooled.dtype == dtype and pooled.shape == (n, c, packed_size(bins)) and pooled.is_contiguous()
    assert_matches(pooled, ref.pool_forward(x.double(), bins), dtype, "pool_forward")

    g = torch.randn(n, c, packed_size(bins), dtype=torch.float64).to(dtype)
    gx = tri.pool_backward(g, bins, h, w, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert gx.dtype == dtype and gx.shape == (n, c, h, w) and gx.is_contiguous(memory_format=fmt)
    assert_matches(gx, ref.pool_backward(g.double(), bins, h, w, channels_last), dtype, "pool_backward")

    # Fused variants: the copy into the concat buffer, and the pass-through gradient added in the same pass.
    pooled2, concat = tri.pool_concat_forward(x, bins, c + 7)
    assert torch.equal(pooled2, pooled) and torch.equal(concat[:, :c], x)
    assert concat.shape == (n, c + 7, h, w) and concat.is_contiguous(memory_format=fmt)
    residual = _x(n, c + 7, h, w, dtype, channels_last)[:, :c]        # a channel slice: a strided view
    gx2 = tri.pool_backward_add(g, bins, residual, channels_last)
    assert gx2.dtype == dtype and gx2.is_contiguous(memory_format=fmt)
    assert_matches(gx2, ref.pool_backward_add(g.double(), bins, residual.double(), channels_last), dtype,
                   "pool_backward_add")


# --------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------

def _check_projection(dtype, n, c, r, bins, training, wdtype=None, config=None):
    wdtype = wdtype or dtype
    pooled = torch.randn(n, c, packed_size(bins), dtype=torch.float64).to(dtype)
    weights, gammas, betas, rmeans, rvars = _params(r, c, bins, wdtype)
    kw = {} if config is None else {"config": config}
    out, z, mean, var = tri.project_forward(pooled, weights, gammas, betas, rmeans, rvars, bins, training,
                                            1e-5, **kw)
    r_out, r_z, r_mean, r_var = ref.project_forward(pooled.double(), _d(weights), _d(gammas), _d(betas),
                                                    _d(rmeans), _d(rvars), bins, training, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and z.dtype == acc and mean.dtype == acc and var.dtype == acc
    assert mean.shape == var.shape == (len(bins), r)
    assert_matches(out, r_out, dtype, "out")
    # z, mean, var are stored in the accumulation dtype: judged at fp32 (fp64) tolerance.
    for name, got, want in (("z", z, r_z), ("mean", mean, r_mean), ("var", var, r_var)):
        assert_matches(got, want, acc, name)

    go = torch.randn(n, r, packed_size(bins), dtype=torch.float64).to(dtype)
    gp, gw, gg, gb = tri.project_backward(go, pooled, z, weights, gammas, betas, mean, var, bins, training,
                                          1e-5, **kw)
    # The reference backward at float64 from the same z/mean/var (so the ReLU masks agree).
    r_gp, r_gw, r_gg, r_gb = ref.project_backward(go.double(), pooled.double(), z.double(), _d(weights),
                                                  _d(gammas), _d(betas), mean.double(), var.double(), bins,
                                                  training, 1e-5)
    assert gp.dtype == dtype and gp.shape == pooled.shape
    assert_matches(gp, r_gp, dtype, "grad_pooled")
    assert len(gw) == len(gg) == len(gb) == len(bins)
    for k in range(len(bins)):
        assert gw[k].shape == weights[k].shape and gw[k].dtype == acc and gg[k].dtype == acc
        assert_matches(gw[k], r_gw[k], acc, f"grad_w[{k}]")
        assert_matches(gg[k], r_gg[k], acc, f"grad_gamma[{k}]")
        assert_matches(gb[k], r_gb[k], acc, f"grad_beta[{k}]")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_projection(dtype, shape, training):
    n, c, _, _, bins = shape
    _check_projection(dtype, n, max(c, 8), R, bins, training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_projection_fp32_weights(dtype):
    """AMP: half-precision activations with fp32 parameters (math in fp32, like the reference)."""
    _check_projection(dtype, 2, 8, R, (1, 2, 3, 6), True, wdtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Upsample + concat
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_upsample(dtype, shape, channels_last):
    n, c, h, w, bins = shape
    x = _x(n, c, h, w, dtype, channels_last)
    branches = torch.randn(n, R, packed_size(bins), dtype=torch.float64).to(dtype)
    out = tri.upsample_forward(x, branches, bins)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.shape == (n, c + len(bins) * R, h, w)
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(out[:, :c], x), "x channels must be copied bit-exactly"
    assert_matches(out, ref.upsample_forward(x.double(), branches.double(), bins), dtype, "upsample_forward")
    into = torch.full_like(out, float("nan"))
    into[:, :c] = x
    tri.upsample_into(into, branches, bins, c)
    assert torch.equal(into, out), "upsample_into must write exactly the branch channels of upsample_forward"

    g = _x(n, c + len(bins) * R, h, w, dtype, channels_last)
    gb = tri.upsample_backward(g, bins, c)
    assert gb.dtype == dtype and gb.shape == branches.shape and gb.is_contiguous()
    assert_matches(gb, ref.upsample_backward(g.double(), bins, c), dtype, "upsample_backward")


def test_upsample_single_row_and_column():
    """H == 1 / W == 1 maps (scale 0 along that axis; stride of a size-1 dim is arbitrary)."""
    for (h, w) in ((1, 7), (6, 1)):
        for cl in (False, True):
            x = _x(1, 3, h, w, torch.float32, cl)
            branches = torch.randn(1, R, 50)
            out = tri.upsample_forward(x, branches, (1, 2, 3, 6))
            assert_matches(out, ref.upsample_forward(x.double(), branches.double(), (1, 2, 3, 6)), torch.float32)
            gb = tri.upsample_backward(out, (1, 2, 3, 6), 3)
            assert_matches(gb, ref.upsample_backward(out.double(), (1, 2, 3, 6), 3), torch.float32)
            pooled = tri.pool_forward(x, (1, 2, 3, 6))
            assert_matches(pooled, ref.pool_forward(x.double(), (1, 2, 3, 6)), torch.float32)


# --------------------------------------------------------------------------------------------------
# Every registered block config, on shapes with partial tiles in every blocked dim (fp32 and bf16)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("config", list(tpool.POOL_FWD_CONFIGS))
def test_pool_configs(config, dtype):
    bins = (1, 2, 3, 6)
    for cl in (False, True):
        x = _x(1, 40, 5, 70, dtype, cl)           # C > 32 and W > 64: two channel blocks, two column chunks
        assert_matches(tri.pool_forward(x, bins, config=config), ref.pool_forward(x.double(), bins), dtype)
        g = torch.randn(1, 40, 50).to(dtype)
        assert_matches(tri.pool_backward(g, bins, 5, 70, cl, config=config),
                       ref.pool_backward(g.double(), bins, 5, 70, cl), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("width", [18, 126, 300], ids=lambda w: f"cw{tpool.pow2(w // 6)}")
def test_pool_nested_tile_widths(width, dtype):
    """Every fine-tile width of the nested path (CW_PAD 16, 32, 64), partial channel blocks, NaN locality."""
    bins = (1, 2, 3, 6)
    assert tpool.nested_level(bins, 6, width) == 6
    for cl in (False, True):
        x = _x(1, 20, 6, width, dtype, cl)       # N=1: BLOCK_C 8, so 3 channel blocks, the last partial
        assert_matches(tri.pool_forward(x, bins), ref.pool_forward(x.double(), bins), dtype)
        g = torch.randn(1, 20, 50).to(dtype)
        assert_matches(tri.pool_backward(g, bins, 6, width, cl), ref.pool_backward(g.double(), bins, 6, width, cl),
                       dtype)
        x[0, 3, 2, 5] = float("nan")        # the nested path keeps a NaN in the cells containing it
        assert torch.equal(tri.pool_forward(x, bins).isnan(), ref.pool_forward(x.double(), bins).isnan())
        g[0, 3, 7] = float("nan")            # ... and a NaN gradient in the pixels of its cell
        cell = torch.zeros(1, 20, 50, dtype=torch.float64)
        cell[0, 3, 7] = 1.0
        assert torch.equal(tri.pool_backward(g, bins, 6, width, cl).isnan(),
                           ref.pool_backward(cell, bins, 6, width, cl) != 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(tproj.PROJ_FWD_CONFIGS))
def test_projection_configs(config, training):
    # M = 2*36 = 72 rows for bin 6, C = 72, R = 68: partial tiles in every GEMM dim of the big config.
    _check_projection(torch.float32, 2, 72, 68, (1, 2, 3, 6), training, config=config)


@pytest.mark.parametrize("config", list(tup.UPSAMPLE_FWD_CONFIGS))
def test_upsample_fwd_configs(config):
    bins = (1, 2, 3, 6)
    for cl in (False, True):
        x = _x(1, 66, 3, 11, torch.float32, cl)
        branches = torch.randn(1, 66, 50)
        out = tri.upsample_forward(x, branches, bins, config=config)
        assert_matches(out, ref.upsample_forward(x.double(), branches.double(), bins), torch.float32)


@pytest.mark.parametrize("config", list(tup.UPSAMPLE_BWD_CONFIGS))
def test_upsample_bwd_configs(config):
    bins = (1, 2, 3, 6)
    for cl in (False, True):
        g = _x(1, 3 + 4 * 66, 2, 130, torch.float32, cl)   # R = 66 > 64, W = 130 > 128
        gb = tri.upsample_backward(g, bins, 3, config=config)
        assert_matches(gb, ref.upsample_backward(g.double(), bins, 3), torch.float32)


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_bitwise_deterministic(dtype):
    n, c, h, w, bins = 2, 3, 7, 9, (1, 2, 3, 6)
    x = _x(n, c, h, w, dtype, True)
    x_nested = _x(n, c, 12, 6, dtype, True)
    g_nested = _x(n, c, 12, 6, dtype, False)
    weights, gammas, betas, rmeans, rvars = _params(R, c, bins, dtype)
    g_pool = torch.randn(n, c, 50).to(dtype)
    g_proj = torch.randn(n, R, 50).to(dtype)
    g_up = _x(n, c + 4 * R, h, w, dtype, True)

    def run():
        pooled, concat = tri.pool_concat_forward(x, bins, c + 4 * R)
        out, z, mean, var = tri.project_forward(pooled, weights, gammas, betas, rmeans, rvars, bins, True, 1e-5)
        tri.upsample_into(concat, out, bins, c)
        bwd = tri.project_backward(g_proj, pooled, z, weights, gammas, betas, mean, var, bins, True, 1e-5)
        nested = [tri.pool_forward(x_nested, bins), tri.pool_backward_add(g_pool, bins, g_nested, False)]
        return nested + [pooled, out, z, mean, var, bwd[0], *bwd[1], *bwd[2], *bwd[3], concat,
                tri.pool_backward(g_pool, bins, h, w, True), tri.upsample_forward(x, out, bins),
                tri.pool_backward_add(g_pool, bins, g_up[:, :c], True), tri.upsample_backward(g_up, bins, c)]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Launch geometry at full size (meta tensors, kernels stubbed): grid limits, registered configs
# --------------------------------------------------------------------------------------------------

_MODULE_KERNELS = {
    tpool: ("_pool_fwd_kernel", "_pool_bwd_kernel", "_pool_nested_fwd_kernel", "_pool_nested_bwd_kernel"),
    tproj: ("_project_fwd_kernel", "_bn_bwd_kernel", "_dgrad_kernel", "_wgrad_kernel"),
    tup: ("_upsample_fwd_kernel", "_upsample_bwd_kernel"),
    thead: ("_head_fwd_kernel", "_merge_stats_kernel", "_head_norm_kernel", "_head_bwd_sums_kernel",
            "_sum_rows_kernel", "_head_bwd_kernel"),
    tconv: ("_conv_fwd_kernel", "_merge_tiles_kernel", "_bn_act_kernel", "_bn_act_bwd_sums_kernel", "_sum_rows_kernel",
            "_bn_act_bwd_kernel"),
}


def test_registry_lists_every_kernel():
    import triton

    registered = {e.name for e in tri.KERNELS}
    for module, names in _MODULE_KERNELS.items():
        found = {k for k, v in vars(module).items() if k.endswith("_kernel")
                 and isinstance(v, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction))}
        assert found == set(names) and found <= registered, (module.__name__, found, registered)
    for e in tri.KERNELS:
        dts = {v for c in e.configs for k, v in c.signature.items() if k.endswith("_ptr")}
        # Kernels reading activations have fp16 and bf16 configs; the ones that only merge accumulation-
        # dtype partials (the head's statistics) have fp32 and fp64 ones. Every kernel has fp32.
        assert {"*fp16", "*bf16"} <= dts or (dts & {"*fp16", "*bf16"} == set() and "*fp64" in dts), e.name
        assert any("*fp32" in c.signature.values() for c in e.configs), e.name


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, grid, args, kw))


def _launch_matches(cfg, args, kw):
    """A registered config with exactly the launch's constexprs, num_warps and pointer dtypes."""
    sig = list(cfg.signature.values())
    ptr_ok = all(sig[i] == "*" + SIG_DTYPE[a.dtype] for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages", "DOT_UPCAST")}
    return (ptr_ok and cfg.num_warps == kw["num_warps"] and cfg.num_stages == kw.get("num_stages", cfg.num_stages)
            and all(cfg.constexprs.get(k) == v for k, v in consts.items()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=_id)
@pytest.mark.parametrize("n,hw", [(16, 90), (1, 60), (8, 61)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_full_size_launch_geometry(monkeypatch, dtype, n, hw, channels_last):
    """N=16, C=2048, R=512 at 90x90 (and N=1 at 60x60, N=8 at 61x61) on meta tensors with the kernels
    stubbed: every grid is within CUDA limits and every launch uses a config the compile test builds."""
    calls = []
    for module, names in _MODULE_KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(name, calls))
    c, r, bins = 2048, 512, (1, 2, 3, 6)
    meta = dict(device="meta", dtype=dtype)
    acc = dict(device="meta", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.empty(n, c, hw, hw, **meta)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pooled = torch.empty(n, c, 50, **meta)
    ws = [torch.empty(r, c, 1, 1, **meta) for _ in bins]
    vs = [torch.empty(r, **meta) for _ in bins]
    tri.pool_forward(x, bins)
    tri.pool_backward(pooled, bins, hw, hw, channels_last)
    _, concat = tri.pool_concat_forward(x, bins, c + 4 * r)
    tri.pool_backward_add(pooled, bins, concat[:, :c], channels_last)
    tri.upsample_into(concat, torch.empty(n, r, 50, **meta), bins, c)
    for training in (True, False):
        tri.project_forward(pooled, ws, vs, vs, vs, vs, bins, training, 1e-5)
        tri.project_backward(torch.empty(n, r, 50, **meta), pooled, torch.empty(n, r, 50, **acc), ws, vs, vs,
                             torch.empty(4, r, **acc), torch.empty(4, r, **acc), bins, training, 1e-5)
    up = tri.upsample_forward(x, torch.empty(n, r, 50, **meta), bins)
    tri.upsample_backward(up, bins, c)
    y = torch.empty(n, r, hw, hw, **meta)                    # the concat-free head's epilogue, O = 512
    y = y.contiguous(memory_format=torch.channels_last) if channels_last else y
    u, bw, o_vec = torch.empty(n, r, hw, 36, **acc), torch.empty(hw, 36, **acc), torch.empty(r, **acc)
    for training in (True, False):
        _, z, _, _ = tri.head_forward(y, u, bw, o_vec, o_vec, o_vec, o_vec, training, 1e-5, True)
        tri.head_backward(torch.empty(n, r, hw, hw, **meta), z, bw, o_vec, o_vec, o_vec, o_vec, training, 1e-5)
    tri.head_forward(y, u, bw, o_vec, o_vec, o_vec, o_vec, False, 1e-5, False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for c_in, o, k, stride, dil, has_res, relu in ((3, 64, 3, 2, 1, False, True), (128, 64, 1, 1, 1, False, True),
                                                   (512, 256, 1, 1, 1, False, True), (256, 256, 3, 1, 2, False, True),
                                                   (512, 512, 3, 1, 4, False, True), (512, 2048, 1, 1, 1, True, True),
                                                   (1024, 2048, 1, 1, 1, False, False), (3, 64, 7, 2, 1, False, True)):
        xc = torch.empty(n, c_in, hw, hw, **meta).contiguous(memory_format=fmt)  # the backbone's conv shapes
        res = torch.empty(n, o, hw, hw, **meta) if has_res else None
        wc = torch.empty(o, c_in, k, k, **meta).contiguous(memory_format=fmt)
        s = 1 if has_res else stride
        tri.conv_bias_act(xc, wc, torch.empty(o, **acc), res, s, dil * (k // 2), dil, relu)
        vec = torch.empty(o, **acc)                                              # training: conv + statistics
        out, y, mean, var = tconv.conv_bn_train_forward(xc, wc, vec, vec, res, s, dil * (k // 2), dil, relu, 1e-5)
        tconv.bn_act_backward(torch.empty_like(out), y, out, vec, vec, mean, var, relu, 1e-5, has_res)

    nested = {"_pool_nested_fwd_kernel", "_pool_nested_bwd_kernel"}     # 60, 90: nested; 61: general path
    expected = {k for v in _MODULE_KERNELS.values() for k in v} - (nested if hw % 6 else {"_pool_fwd_kernel",
                                                                                         "_pool_bwd_kernel"})
    assert {name for name, *_ in calls} == expected
    entries = {e.name: e for e in tri.KERNELS}
    for name, grid, args, kw in calls:
        assert 1 <= grid[0] < 2 ** 31 and all(1 <= g < 65536 for g in grid[1:]), (name, grid)
        assert any(_launch_matches(cfg, args, kw) for cfg in entries[name].configs), (name, kw)


# --------------------------------------------------------------------------------------------------
# Compile for sm80 / sm90 (results of the background job)
# --------------------------------------------------------------------------------------------------

_SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("kernel", [e.name for e in tri.KERNELS])
def test_compile(compile_job, kernel, cc):
    entry = next(e for e in tri.KERNELS if e.name == kernel)
    recs = {r["config"]: r for r in compile_job.results() if r["kernel"] == kernel and r["cc"] == cc}
    assert set(recs) == {c.name for c in entry.configs}
    errors = {name: r["error"] for name, r in recs.items() if "error" in r}
    assert not errors, "\n\n".join(f"{k}:\n{v}" for k, v in errors.items())
    over = {name: r["shared"] for name, r in recs.items() if r["shared"] > _SHARED_LIMIT[cc]}
    assert not over, f"static shared memory over the sm_{cc} limit: {over}"
