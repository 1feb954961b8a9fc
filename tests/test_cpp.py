"""The compiled CPU backend (``csrc/``) against the pure-PyTorch oracle ``psp_kernels.reference``.

Every one of the six backend functions is compared with the reference evaluated in float64 on the
same (upcast) inputs: float64 to 1e-12, float32 to 1e-5, float16/bfloat16 to a few ulps of the
dtype (normwise: max |error| / max |reference|). Also checked: results' dtypes and memory formats,
NCHW / channels_last / non-contiguous inputs, bitwise determinism (repeat runs, 1 vs 2 threads,
NCHW vs channels_last), and that invalid internal arguments raise instead of crashing.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from psp_kernels import reference as ref
from psp_kernels.geometry import packed_size

FUNCTIONS = ("pool_forward", "pool_backward", "project_forward", "project_backward",
             "upsample_forward", "upsample_backward", "pool_concat_forward", "upsample_into", "pool_backward_add")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5,
       torch.float16: 4 * torch.finfo(torch.float16).eps, torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}
# (shape of x, bins): odd sizes with overlapping windows; H, W < 6 (bins larger than the input); semseg-like.
CASES = [((2, 5, 13, 17), (1, 2, 3, 6)), ((1, 3, 5, 4), (1, 2, 3, 6)), ((2, 8, 60, 60), (1, 3, 5))]
CASE_IDS = ["13x17", "5x4", "60x60"]
EPS = 1e-5


@pytest.fixture(scope="module")
def ext():
    """The compiled extension as the package finds it (built by setup.py, else a JIT build of csrc/)."""
    from psp_kernels._extension import load_extension
    module = load_extension()
    assert module is not None, "psp_kernels._C could not be built or loaded (see the warning)"
    return module


@pytest.fixture
def threads():
    """Lets a test change torch's thread count; restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def rand(*shape, dtype=torch.float64, seed=0):
    """Standard normal values in ``dtype`` (drawn in float64, so every dtype sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def assert_close(actual, expected, dtype, what=""):
    """Normwise relative error of ``actual`` vs the float64 ``expected`` within TOL[dtype]."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3e}"


def make_x(shape, dtype, layout, seed=0):
    """x in one of the layouts the kernels see: 'nchw', 'channels_last' or 'strided' (x[:, ::2])."""
    if layout == "strided":
        n, c, h, w = shape
        x = rand(n, 2 * c, h, w, dtype=dtype, seed=seed)[:, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = rand(*shape, dtype=dtype, seed=seed)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_params(c, r, bins, dtype, seed=1):
    """Per-bin conv weights [R, C, 1, 1], gammas, betas, running means and vars (positive) in ``dtype``."""
    nb = len(bins)
    ws = [rand(r, c, 1, 1, seed=seed + k).div(math.sqrt(c)).to(dtype) for k in range(nb)]
    gammas = [(1 + 0.5 * rand(r, seed=seed + 10 + k)).to(dtype) for k in range(nb)]
    betas = [(0.2 * rand(r, seed=seed + 20 + k)).to(dtype) for k in range(nb)]
    means = [(0.3 * rand(r, seed=seed + 30 + k)).to(dtype) for k in range(nb)]
    vars_ = [(0.5 + rand(r, seed=seed + 40 + k).abs()).to(dtype) for k in range(nb)]
    return ws, gammas, betas, means, vars_


def f64(ts):
    return [t.double() for t in ts]


def flat(ts):
    return torch.cat([t.flatten() for t in ts])


def is_nhwc(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_names_and_arguments_as_reference(ext, name):
    """Every reference function exists in the extension and accepts the reference's keyword names."""
    assert callable(getattr(ext, name))
    params = list(inspect.signature(getattr(ref, name)).parameters)
    doc = getattr(ext, name).__doc__
    assert f"{name}({', '.join(params[:1])}" in doc and all(f"{p}:" in doc for p in params), doc


def test_keyword_call(ext):
    x, bins = rand(1, 2, 7, 5), (1, 2)
    assert torch.equal(ext.pool_forward(x=x, bins=bins), ext.pool_forward(x, list(bins)))
    g = ext.pool_forward(x, bins)
    got = ext.pool_backward(grad_pooled=g, bins=bins, height=7, width=5, channels_last=True)
    assert got.shape == x.shape and is_nhwc(got)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_forward(ext, dtype, shape, bins, layout):
    x = make_x(shape, dtype, layout)
    got = ext.pool_forward(x, bins)
    assert got.dtype == dtype and got.is_contiguous()
    assert_close(got, ref.pool_forward(x.double(), bins), dtype, "pool_forward")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_backward(ext, dtype, shape, bins, channels_last):
    n, c, h, w = shape
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=3)
    got = ext.pool_backward(g, bins, h, w, channels_last)
    assert got.dtype == dtype and got.shape == shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(got, ref.pool_backward(g.double(), bins, h, w, channels_last), dtype, "pool_backward")


# ---------------------------------------------------------------------------------------------
# projection (1x1 conv + BatchNorm + ReLU)
# ---------------------------------------------------------------------------------------------

# (dtype of pooled, dtype of the conv / BatchNorm parameters): parameters are x's dtype or fp32.
DTYPE_PAIRS = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float32),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
DTYPE_PAIR_IDS = [f"{str(a)[6:]}-{str(b)[6:]}params" for a, b in DTYPE_PAIRS]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_project_forward(ext, dtype, param_dtype, shape, bins, training):
    n, c = shape[:2]
    r = 3
    pooled = rand(n, c, packed_size(bins), dtype=dtype, seed=5)
    params = bn_params(c, r, bins, param_dtype)
    out, z, mean, var = ext.project_forward(pooled, *params, bins, training, EPS)
    e_out, e_z, e_mean, e_var = ref.project_forward(pooled.double(), *map(f64, params), bins, training, EPS)
    acc = acc_of(dtype)
    assert out.dtype == dtype and (z.dtype, mean.dtype, var.dtype) == (acc, acc, acc)
    assert out.is_contiguous() and z.is_contiguous()
    assert_close(z, e_z, acc, "z")
    assert_close(mean, e_mean, acc, "mean")
    assert_close(var, e_var, acc, "var")
    assert_close(out, e_out, dtype, "out")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_project_backward(ext, dtype, param_dtype, shape, bins, training):
    n, c = shape[:2]
    r = 3
    pooled = rand(n, c, packed_size(bins), dtype=dtype, seed=5)
    ws, gammas, betas, means, vars_ = bn_params(c, r, bins, param_dtype)
    _, z, mean, var = ext.project_forward(pooled, ws, gammas, betas, means, vars_, bins, training, EPS)
    check_project_backward(ext, pooled, z, mean, var, ws, gammas, betas, bins, training)


def check_project_backward(backend, pooled, z, mean, var, ws, gammas, betas, bins, training):
    """``backend.project_backward`` of a random grad_out against the reference at float64 from the same
    z / mean / var (so the ReLU masks agree); also used by tests/test_cuda.py."""
    n, r = z.shape[:2]
    dtype, acc = pooled.dtype, acc_of(pooled.dtype)
    grad_out = rand(n, r, packed_size(bins), dtype=dtype, seed=7).to(pooled.device)
    gp, gw, gg, gb = backend.project_backward(grad_out, pooled, z, ws, gammas, betas, mean, var, bins, training,
                                              EPS)
    e_gp, e_gw, e_gg, e_gb = ref.project_backward(grad_out.double(), pooled.double(), z.double(), f64(ws),
                                                  f64(gammas), f64(betas), mean.double(), var.double(), bins,
                                                  training, EPS)
    assert gp.dtype == dtype and gp.is_contiguous()
    assert_close(gp, e_gp, dtype, "grad_pooled")
    assert isinstance(gw, list) and len(gw) == len(gg) == len(gb) == len(bins)
    for k in range(len(bins)):
        assert gw[k].shape == ws[k].shape and gw[k].dtype == acc
        assert gg[k].shape == gb[k].shape == (r,) and gg[k].dtype == gb[k].dtype == acc
    # Normwise over all bins: a bin with N*b*b = 2 has an (analytically) zero weight gradient in training,
    # whose rounding noise is only meaningful relative to the other bins' gradients.
    for what, got_k, exp_k in (("grad_w", gw, e_gw), ("grad_gamma", gg, e_gg), ("grad_beta", gb, e_gb)):
        assert_close(flat(got_k), flat(exp_k), acc, what)


# ---------------------------------------------------------------------------------------------
# upsampling + concat
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_forward(ext, dtype, shape, bins, layout):
    x = make_x(shape, dtype, layout)
    branches = rand(shape[0], 3, packed_size(bins), dtype=dtype, seed=9)
    got = ext.upsample_forward(x, branches, bins)
    assert got.dtype == dtype and got.shape == (shape[0], shape[1] + 3 * len(bins), *shape[2:])
    assert is_nhwc(got) == (layout == "channels_last") and (is_nhwc(got) or got.is_contiguous())
    assert torch.equal(got[:, :shape[1]], x), "x's channels must be copied exactly"
    assert_close(got, ref.upsample_forward(x.double(), branches.double(), bins), dtype, "upsample_forward")


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,bins", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_backward(ext, dtype, shape, bins, layout):
    n, c, h, w = shape
    r = 3
    grad_out = make_x((n, c + r * len(bins), h, w), dtype, layout, seed=11)
    got = ext.upsample_backward(grad_out, bins, c)
    assert got.dtype == dtype and got.shape == (n, r, packed_size(bins)) and got.is_contiguous()
    assert_close(got, ref.upsample_backward(grad_out.double(), bins, c), dtype, "upsample_backward")


def test_upsample_identity_and_single_pixel(ext):
    """b == H (identity taps) and H == W == 1 (a tensor that is both NCHW and channels_last)."""
    for shape, bins in [((1, 2, 3, 3), (1, 3)), ((2, 3, 1, 1), (1, 2))]:
        x = rand(*shape)
        branches = rand(shape[0], 2, packed_size(bins), seed=2)
        assert_close(ext.upsample_forward(x, branches, bins), ref.upsample_forward(x, branches, bins),
                     torch.float64, str(shape))
        g = ext.pool_forward(x, bins)
        assert_close(g, ref.pool_forward(x, bins), torch.float64, str(shape))


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------

def run_all(ext, dtype, layout, training=True):
    """Every function once on one fixed problem large enough to be split over threads; flat results."""
    bins, r = (1, 2, 3, 6), 384
    x = make_x((2, 64, 37, 45), dtype, layout, seed=13)
    n, c, h, w = x.shape
    pooled = ext.pool_forward(x, bins)
    params = bn_params(c, r, bins, acc_of(dtype), seed=17)
    out, z, mean, var = ext.project_forward(pooled, *params, bins, training, EPS)
    grad_out = rand(n, r, packed_size(bins), dtype=dtype, seed=19)
    gp, gw, gg, gb = ext.project_backward(grad_out, pooled, z, params[0], params[1], params[2], mean, var, bins,
                                          training, EPS)
    up = ext.upsample_forward(x, out, bins)
    gu = ext.upsample_backward(make_x(tuple(up.shape), dtype, layout, seed=23), bins, c)
    gx = ext.pool_backward(gp, bins, h, w, layout == "channels_last")
    return [pooled, out, z, mean, var, gp, *gw, *gg, *gb, up, gu, gx]


def assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for i, (s, t) in enumerate(zip(a, b)):
        assert s.dtype == t.dtype and torch.equal(s, t), f"{what}: result {i} differs"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_threads(ext, threads, dtype, layout):
    threads(2)
    first = run_all(ext, dtype, layout)
    assert_bitwise(first, run_all(ext, dtype, layout), "two runs, 2 threads")
    threads(1)
    assert_bitwise(first, run_all(ext, dtype, layout), "1 vs 2 threads")


def test_projection_deterministic_at_semseg_size(ext, threads):
    """C = 2048, R = 512: sizes where a multi-threaded BLAS GEMM changes bits with the thread count."""
    bins, n, c, r = (1, 2, 3, 6), 2, 2048, 512
    pooled = rand(n, c, packed_size(bins), dtype=torch.float32, seed=29)
    params = bn_params(c, r, bins, torch.float32, seed=31)
    grad_out = rand(n, r, packed_size(bins), dtype=torch.float32, seed=37)

    def run():
        out, z, mean, var = ext.project_forward(pooled, *params, bins, True, EPS)
        gp, gw, gg, gb = ext.project_backward(grad_out, pooled, z, *params[:3], mean, var, bins, True, EPS)
        return [out, z, mean, var, gp, *gw, *gg, *gb]

    threads(2)
    first = run()
    threads(1)
    assert_bitwise(first, run(), "1 vs 2 threads")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_layouts_give_identical_bits(ext, dtype):
    """Pooling and upsampling use one per-lane reduction order for NCHW and channels_last."""
    bins = (1, 2, 3, 6)
    x = make_x((2, 70, 13, 17), dtype, "nchw")
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ext.pool_forward(x, bins), ext.pool_forward(xc, bins))
    g = rand(2, 70, packed_size(bins), dtype=dtype, seed=4)
    assert torch.equal(ext.pool_backward(g, bins, 13, 17, False), ext.pool_backward(g, bins, 13, 17, True))
    branches = rand(2, 67, packed_size(bins), dtype=dtype, seed=6)
    assert torch.equal(ext.upsample_forward(x, branches, bins), ext.upsample_forward(xc, branches, bins))
    go = rand(2, 70 + 4 * 67, 13, 17, dtype=dtype, seed=8)
    assert torch.equal(ext.upsample_backward(go, bins, 70),
                       ext.upsample_backward(go.contiguous(memory_format=torch.channels_last), bins, 70))


# ---------------------------------------------------------------------------------------------
# internal invariants raise (never crash)
# ---------------------------------------------------------------------------------------------

def test_invalid_arguments_raise(ext):
    x, bins = rand(1, 2, 5, 5), (1, 2)
    s = packed_size(bins)
    params = bn_params(2, 3, bins, torch.float64)
    with pytest.raises(RuntimeError, match="bins must not be empty"):
        ext.pool_forward(x, [])
    with pytest.raises(RuntimeError, match=">= 1"):
        ext.pool_forward(x, [0, 2])
    with pytest.raises(RuntimeError, match="4-D"):
        ext.pool_forward(x[0], bins)
    with pytest.raises(RuntimeError, match="S = sum"):
        ext.pool_backward(rand(1, 2, s + 1), bins, 5, 5, False)
    with pytest.raises(RuntimeError, match="one tensor per bin"):
        ext.project_forward(rand(1, 2, s), params[0][:1], *params[1:], bins, True, EPS)
    with pytest.raises(RuntimeError, match=r"\[R, C, 1, 1\]"):
        ext.project_forward(rand(1, 4, s), *params, bins, True, EPS)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ext.project_backward(rand(1, 3, s), rand(1, 2, s), rand(1, 3, s, dtype=torch.float32), *params[:3],
                             rand(2, 3), rand(2, 3).abs(), bins, True, EPS)
    with pytest.raises(RuntimeError, match="batch"):
        ext.upsample_forward(x, rand(2, 3, s), bins)
    with pytest.raises(RuntimeError, match="len\\(bins\\)"):
        ext.upsample_backward(rand(1, 2 + 5, 5, 5), bins, 2)


# ---------------------------------------------------------------------------------------------
# fused-pass variants (used by the whole-PPM op)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fused_pass_variants(ext, case, dtype, layout):
    """pool_concat_forward == (pool_forward, x copied); upsample_into writes exactly the branch channels of
    upsample_forward; pool_backward_add == reference residual + pool_backward, rounded once."""
    shape, bins = case
    n, c, h, w = shape
    x = make_x(shape, dtype, layout)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    pooled, concat = ext.pool_concat_forward(x, list(bins), c + 3 * len(bins))
    assert torch.equal(pooled, ext.pool_forward(x, list(bins))) and torch.equal(concat[:, :c], x)
    assert concat.shape == (n, c + 3 * len(bins), h, w) and concat.is_contiguous(memory_format=fmt)
    branches = rand(n, 3, packed_size(bins), dtype=dtype, seed=2)
    ext.upsample_into(concat, branches, list(bins), c)
    assert torch.equal(concat, ext.upsample_forward(x, branches, list(bins)))
    residual = make_x((n, c + 4, h, w), dtype, layout, seed=3)[:, :c]      # a channel slice (strided view)
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=4)
    gx = ext.pool_backward_add(g, list(bins), residual, layout == "channels_last")
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=fmt)
    assert_close(gx, ref.pool_backward_add(g.double(), bins, residual.double(), layout == "channels_last"), dtype,
                 "pool_backward_add")
