"""The public ops and PyramidPooling, on every CPU-runnable backend, against semseg's PPM.

Oracle: ``SemsegPPM`` (semseg's nn.Sequential PPM) in float64. Low-precision results are judged as in
flash-attention: our error vs the fp64 oracle must be at most 2x eager PyTorch's own error in the same
dtype, plus a small atol. The Triton backend runs under ``TRITON_INTERPRET=1`` (set in conftest).
"""

from __future__ import annotations

import pytest
import torch

import psp_kernels
from psp_kernels import multibin_avg_pool, project_bn_relu, pyramid_pooling, upsample_concat
from psp_kernels.geometry import packed_size, split_bins
from psp_kernels.reference import SemsegPPM

BACKENDS = ["reference", "cpp", "triton"]
LOW = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol per dtype
# (N, C, H, W, bins): odd sizes, H/W below the largest bin, non-default bins, nesting windows (12x18)
SHAPES = [(2, 8, 13, 17, (1, 2, 3, 6)), (2, 8, 5, 4, (1, 2, 3, 6)), (2, 6, 12, 12, (1, 3, 5)),
          (2, 8, 12, 18, (1, 2, 3, 6))]
LAYOUTS = ["nchw", "channels_last", "strided"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with psp_kernels.use_backend(request.param):
        yield request.param


def make_x(n, c, h, w, dtype=torch.float64, layout="nchw"):
    if layout == "strided":  # every other channel of a wider tensor: neither NCHW nor NHWC contiguous
        return torch.randn(n, 2 * c, h, w, dtype=torch.float64)[:, ::2].to(dtype)
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_ppm(c, bins, dtype=torch.float64, fused=True):
    """A PyramidPooling and a SemsegPPM with the same random, non-trivial parameters and statistics."""
    ref = SemsegPPM(c, max(c // len(bins), 2), bins)
    with torch.no_grad():
        for f in ref.features:
            f[2].weight.uniform_(0.5, 1.5)
            f[2].bias.uniform_(-0.5, 0.5)
            f[2].running_mean.uniform_(-0.2, 0.2)
            f[2].running_var.uniform_(0.5, 2.0)
    ours = psp_kernels.PyramidPooling(c, max(c // len(bins), 2), bins, fused=fused)
    ours.load_state_dict(ref.state_dict())
    return ours.to(dtype), ref.to(dtype)


def assert_low_precision_close(ours, eager, oracle, dtype, what):
    err = (ours.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    bound = 2 * eager_err + LOW[dtype] * max(1.0, oracle.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager {dtype} error {eager_err:.3g})"


# --- module vs semseg PPM ---------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-bins{len(s[4])}")
def test_module_matches_semseg_fp64(backend, shape, layout, training):
    n, c, h, w, bins = shape
    ours, ref = make_ppm(c, bins)
    ours.train(training), ref.train(training)
    x = make_x(n, c, h, w, layout=layout)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, expected = ours(xa), ref(xb)
    assert out.shape == (n, c + len(bins) * ours.features[0][1].out_channels, h, w)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" and c > 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(expected)
    out.backward(g), expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_module_low_precision(backend, dtype, layout, training):
    n, c, h, w, bins = 2, 8, 13, 17, (1, 2, 3, 6)
    ours, oracle = make_ppm(c, bins)
    eager = SemsegPPM(c, c // 4, bins)
    eager.load_state_dict(oracle.state_dict())
    ours, eager = ours.to(dtype), eager.to(dtype)
    for m in (ours, oracle, eager):
        m.train(training)
    x64 = make_x(n, c, h, w, layout=layout)
    x = x64.to(dtype).requires_grad_()
    x_eager = x64.to(dtype).requires_grad_()
    x_oracle = x.detach().double().requires_grad_()  # oracle sees the same rounded input
    out, out_eager, out_oracle = ours(x), eager(x_eager), oracle(x_oracle)
    assert out.dtype == dtype
    assert_low_precision_close(out, out_eager, out_oracle, dtype, "forward")
    g64 = torch.randn_like(out_oracle)
    out.backward(g64.to(dtype)), out_eager.backward(g64.to(dtype)), out_oracle.backward(g64.to(dtype).double())
    assert_low_precision_close(x.grad, x_eager.grad, x_oracle.grad, dtype, "grad x")
    for (name, p), pe, po in zip(ours.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_low_precision_close(p.grad, pe.grad, po.grad, dtype, f"grad {name}")


def test_module_n1_eval_60x60(backend):
    ours, ref = make_ppm(4, (1, 2, 3, 6))
    ours.eval(), ref.eval()
    x = make_x(1, 4, 60, 60)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_module_running_stats_follow_batchnorm(backend):
    """Three training steps, then eval: buffers and outputs track nn.BatchNorm2d exactly (fp32)."""
    ours, ref = make_ppm(8, (1, 2, 3, 6), torch.float32)
    for m in (ours, ref):
        m.features[0][2].momentum = 0.3
        for f in m.features[1:]:
            f[2].momentum = 0.3
    for _ in range(3):
        x = make_x(2, 8, 13, 17, torch.float32)
        ours(x), ref(x)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-6, msg=name)
    assert all(int(f[2].num_batches_tracked) == 3 for f in ours.features)
    ours.eval(), ref.eval()
    x = make_x(2, 8, 13, 17, torch.float32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_module_cumulative_momentum(backend):
    ours, ref = make_ppm(8, (1, 2, 3, 6))
    for m in (ours, ref):
        for f in m.features:
            f[2].momentum = None
    for _ in range(2):
        x = make_x(2, 8, 7, 9)
        ours(x), ref(x)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=name)


def test_module_deterministic_bitwise(backend):
    ours, _ = make_ppm(8, (1, 2, 3, 6), torch.float32)
    x = make_x(2, 8, 13, 17, torch.float32, "channels_last")
    g = torch.randn(2, 16, 13, 17)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        ours.zero_grad()
        out = ours(xi)
        out.backward(g)
        results.append([out, xi.grad] + [p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nan_propagates(backend):
    """A NaN in image 1 reaches every output the oracle makes NaN, and never image 0.

    The C++ and reference backends reproduce the oracle's NaN set exactly. The Triton pooling sums
    windows with 0/1-mask dot products, so a NaN also reaches the other cells of its (n, c) row
    (documented in psp_kernels/triton/pooling.py): a superset, still confined to its image.
    """
    ours, ref = make_ppm(8, (1, 2, 3, 6))
    ours.eval(), ref.eval()
    x = make_x(2, 8, 13, 17)
    x[1, 3, 4, 5] = float("nan")
    got, expected = torch.isnan(ours(x)), torch.isnan(ref(x))
    assert expected[1].any() and not got[0].any()
    assert got[expected].all()
    if backend != "triton":
        assert torch.equal(got, expected)


def test_one_value_per_channel_in_training_raises_like_pytorch(backend):
    ours, ref = make_ppm(8, (1, 2, 3, 6))
    x = make_x(1, 8, 13, 17)
    with pytest.raises(ValueError) as expected:
        ref(x)
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)
    ours.eval()
    assert ours(x).shape == (1, 16, 13, 17)  # N=1 is fine in eval


# --- the ops one by one -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 13, 17, (1, 2, 3, 6)), (1, 2, 5, 4, (1, 2, 3, 6)),
                                   (2, 3, 7, 6, (1, 3, 5))], ids=lambda s: "x".join(map(str, s[:4])))
def test_gradcheck_fp64(backend, shape, layout):
    n, c, h, w, bins = shape
    # Random-projection gradcheck on the larger map, and on Triton (interpreted kernels are slow; its
    # gradients are also pinned to the reference backward at 1e-12 in test_triton.py).
    fast = h * w > 100 or backend == "triton"
    x = make_x(n, c, h, w, layout=layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: multibin_avg_pool(t, bins), (x,), fast_mode=fast)
    branches = torch.randn(n, 2, packed_size(bins), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, b: upsample_concat(t, b, bins), (x, branches), fast_mode=fast)
    pooled = torch.randn(n, c, packed_size(bins), dtype=torch.float64, requires_grad=True)
    params = [torch.randn(2, c, 1, 1, dtype=torch.float64, requires_grad=True) for _ in bins]
    gammas = [torch.rand(2, dtype=torch.float64, requires_grad=True) for _ in bins]
    betas = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in bins]
    running = [torch.rand(2, dtype=torch.float64) + 0.5 for _ in bins]
    for training in (True, False) if n > 1 else (False,):  # N=1 has one value per channel in bin 1
        def f(p, *ts):
            k = len(bins)
            return project_bn_relu(p, ts[:k], ts[k:2 * k], ts[2 * k:], [r.clone() for r in running],
                                   [r.clone() for r in running], bins, training=training)
        assert torch.autograd.gradcheck(f, (pooled, *params, *gammas, *betas), fast_mode=fast)


def test_pyramid_pooling_op_equals_the_three_ops(backend):
    """The whole-PPM op (fused passes) and the three separate ops give the same forward and gradients."""
    n, c, r, bins = 2, 3, 2, (1, 2, 3, 6)
    params = [[torch.randn(r, c, 1, 1, dtype=torch.float64, requires_grad=True) for _ in bins],
              [torch.rand(r, dtype=torch.float64, requires_grad=True) for _ in bins],
              [torch.randn(r, dtype=torch.float64, requires_grad=True) for _ in bins]]
    running = [[torch.zeros(r, dtype=torch.float64) for _ in bins], [torch.ones(r, dtype=torch.float64) for _ in bins]]
    for layout in ("nchw", "channels_last"):
        x = make_x(n, c, 12, 18, layout=layout).requires_grad_()
        whole = pyramid_pooling(x, *params, *running, bins, training=True)
        parts = upsample_concat(x, project_bn_relu(multibin_avg_pool(x, bins), *params, *running, bins,
                                                   training=True), bins)
        torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(whole)
        flat = [x] + [p for group in params for p in group]
        for a, b in zip(torch.autograd.grad(whole, flat, g), torch.autograd.grad(parts, flat, g)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pyramid_pooling_gradcheck(backend):
    n, c, r, bins = 2, 2, 2, (1, 2, 3, 6)
    x = make_x(n, c, 6, 6, layout="channels_last").requires_grad_()
    ws = [torch.randn(r, c, 1, 1, dtype=torch.float64, requires_grad=True) for _ in bins]
    gs = [torch.rand(r, dtype=torch.float64, requires_grad=True) for _ in bins]
    bs = [torch.randn(r, dtype=torch.float64, requires_grad=True) for _ in bins]
    running = [torch.rand(r, dtype=torch.float64) + 0.5 for _ in bins]

    def f(t, *ts):
        k = len(bins)
        return pyramid_pooling(t, ts[:k], ts[k:2 * k], ts[2 * k:], [v.clone() for v in running],
                               [v.clone() for v in running], bins, training=True)
    assert torch.autograd.gradcheck(f, (x, *ws, *gs, *bs), fast_mode=True)


def test_pool_matches_adaptive_avg_pool(backend):
    bins = (1, 2, 3, 6)
    x = make_x(2, 3, 5, 4)  # H, W < 6: windows repeat rows and columns
    for got, b in zip(split_bins(multibin_avg_pool(x, bins), bins), bins):
        torch.testing.assert_close(got, torch.nn.functional.adaptive_avg_pool2d(x, b), rtol=1e-13, atol=1e-14)


def test_opcheck(backend):
    bins = [1, 2, 3, 6]
    for layout in ("nchw", "channels_last"):
        x = make_x(2, 3, 7, 9, layout=layout).requires_grad_()
        torch.library.opcheck(torch.ops.psp.multibin_avg_pool.default, (x, bins))
        branches = torch.randn(2, 2, 50, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.psp.upsample_concat.default, (x, branches, bins))
    pooled = torch.randn(2, 3, 50, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True) for _ in bins]
    gs = [torch.rand(2, dtype=torch.float64, requires_grad=True) for _ in bins]
    bs = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in bins]
    rs = [torch.rand(2, dtype=torch.float64) + 0.5 for _ in bins]
    for training in (True, False):
        torch.library.opcheck(torch.ops.psp.project_bn_relu.default, (pooled, ws, gs, bs, rs, rs, bins, training, 1e-5))
        for layout in ("nchw", "channels_last"):
            x = make_x(2, 3, 6, 12, layout=layout).requires_grad_()
            torch.library.opcheck(torch.ops.psp.pyramid_pooling.default, (x, ws, gs, bs, rs, rs, bins, training, 1e-5))


def test_torch_compile_fullgraph_no_graph_break():
    ours, ref = make_ppm(8, (1, 2, 3, 6), torch.float32)
    compiled = torch.compile(ours, fullgraph=True)
    x = make_x(2, 8, 13, 17, torch.float32).requires_grad_()
    out = compiled(x)
    out.sum().backward()
    xr = x.detach().clone().requires_grad_()
    expected = ref(xr)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-6, msg=name)


# --- bad input ------------------------------------------------------------------------------------------

def _project_args(n=2, c=3, r=2, bins=(1, 2, 3, 6), **over):
    args = dict(pooled=torch.randn(n, c, packed_size(bins)),
                weights=[torch.randn(r, c, 1, 1) for _ in bins], bn_weights=[torch.ones(r) for _ in bins],
                bn_biases=[torch.zeros(r) for _ in bins], running_means=[torch.zeros(r) for _ in bins],
                running_vars=[torch.ones(r) for _ in bins], bins=bins)
    args.update(over)
    return args


def _ppm_params():
    args = _project_args()
    return [args[k] for k in ("weights", "bn_weights", "bn_biases", "running_means", "running_vars")]


@pytest.mark.parametrize("call, error, match", [
    (lambda: multibin_avg_pool(torch.randn(3, 5, 5)), ValueError, "x must be 4-D"),
    (lambda: multibin_avg_pool(torch.ones(1, 2, 5, 5, dtype=torch.int64)), TypeError, "x must be float"),
    (lambda: multibin_avg_pool([[1.0]]), TypeError, "x must be a torch.Tensor"),
    (lambda: multibin_avg_pool(torch.randn(0, 2, 5, 5)), ValueError, "x must not be empty"),
    (lambda: multibin_avg_pool(torch.randn(1, 2, 5, 5), bins=()), ValueError, "bins must not be empty"),
    (lambda: multibin_avg_pool(torch.randn(1, 2, 5, 5), bins=(0, 2)), ValueError, "bins must contain sizes >= 1"),
    (lambda: multibin_avg_pool(torch.randn(1, 2, 5, 5), bins=(2, 2)), ValueError, "bins must not repeat"),
    (lambda: multibin_avg_pool(torch.randn(1, 2, 5, 5), bins=(1.5,)), TypeError, "bins must contain ints"),
    (lambda: multibin_avg_pool(torch.randn(1, 2, 5, 5), bins=6), TypeError, "bins must be a sequence"),
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 49)), ValueError, "branches must have shape"),
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 50, dtype=torch.float64)), TypeError,
     "branches must have x's dtype"),
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 50, device="meta")), RuntimeError,
     "branches is on meta"),
    (lambda: project_bn_relu(**_project_args(pooled=torch.randn(2, 3, 49))), ValueError, "pooled must have S"),
    (lambda: project_bn_relu(**_project_args(weights=[torch.randn(2, 3, 1, 1)] * 3)), ValueError,
     "weights must hold one tensor per bin"),
    (lambda: project_bn_relu(**_project_args(weights=[torch.randn(2, 4, 1, 1)] * 4)), ValueError,
     r"weights\[0\] must have shape \(2, 3, 1, 1\)"),
    (lambda: project_bn_relu(**_project_args(weights=[torch.randn(2, 3, 1, 1, device="meta")] * 4)), RuntimeError,
     r"weights\[0\] is on meta"),
    (lambda: project_bn_relu(**_project_args(bn_weights=[torch.ones(3)] * 4)), ValueError, r"bn_weights\[0\] must"),
    (lambda: project_bn_relu(**_project_args(running_vars=torch.ones(4, 2))), TypeError, "running_vars must be a list"),
    (lambda: psp_kernels.PyramidPooling(0, 2), ValueError, "in_channels must be a positive int"),
    (lambda: psp_kernels.PyramidPooling(8, 2, bins=(1, 1)), ValueError, "bins must not repeat"),
    (lambda: psp_kernels.set_backend("cuda-graphs"), ValueError, "backend must be one of"),
    (lambda: pyramid_pooling(torch.randn(3, 5, 5), *_ppm_params()), ValueError, "x must be 4-D"),
    (lambda: pyramid_pooling(torch.randn(2, 4, 5, 5), *_ppm_params()), ValueError,
     r"weights\[0\] must have shape \(2, 4, 1, 1\)"),
    (lambda: pyramid_pooling(torch.randn(1, 3, 5, 5), *_ppm_params(), training=True), ValueError,
     "Expected more than 1 value per channel when training"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_mismatch_is_explained():
    with pytest.raises(RuntimeError, match="backend 'cpp' needs CPU tensors"):
        psp_kernels.backends.resolve(torch.device("cuda"), "cpp")


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    """No built _C and no JIT: the package still works on CPU through the reference, and says so once."""
    import sys
    import warnings

    from psp_kernels import _extension, backends

    monkeypatch.delattr(psp_kernels, "_C", raising=False)  # an earlier import left it on the package
    monkeypatch.setitem(sys.modules, "psp_kernels._C", None)  # makes `from . import _C` raise ImportError
    monkeypatch.setenv("PSP_KERNELS_NO_JIT", "1")
    _extension.load_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backends.resolve(torch.device("cpu"), "auto") is psp_kernels.reference
            assert backends.resolve(torch.device("cpu"), "auto") is psp_kernels.reference
            ours, ref = make_ppm(8, (1, 2, 3, 6))
            x = make_x(2, 8, 7, 9)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
        messages = [str(w.message) for w in caught if "psp_kernels._C is not built" in str(w.message)]
        assert len(messages) == 1 and "PyTorch reference" in messages[0]
        with pytest.raises(RuntimeError, match="backend 'cpp' requested but the C\\+\\+ extension"):
            backends.resolve(torch.device("cpu"), "cpp")
    finally:
        _extension.load_extension.cache_clear()


def test_auto_measures_and_keeps_the_faster_backend(monkeypatch):
    """``auto`` with two candidates: each shape class is timed once and then always runs the faster one;
    an optional function only one candidate has goes to it; a function none has is absent."""
    from psp_kernels import backends

    class Fake:
        def __init__(self, name, ms):
            self.name, self.ms, self.calls = name, ms, 0

        def pool_forward(self, x, bins):
            self.calls += 1
            return self.name

    slow, fast = Fake("slow", 2.0), Fake("fast", 1.0)
    fast.pool_concat_forward = lambda x, bins, total: "fast-only"
    timings = {"slow": 2.0, "fast": 1.0}

    def _fake_ms(fn):
        return timings[fn()]
    monkeypatch.setattr(backends, "_time_ms", _fake_ms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    choice = backends.MeasuredChoice({"slow": slow, "fast": fast})
    x = torch.randn(2, 3, 12, 12)
    assert choice.pool_forward(x, [1, 2]) == "fast"
    assert choice.pool_forward(torch.randn(2, 3, 11, 12), [1, 2]) == "fast"   # same shape class: no new timing
    assert list(choice.choices.values()) == ["fast"]
    timings.update(slow=0.5)
    assert choice.pool_forward(torch.randn(2, 3, 40, 40), [1, 2]) == "slow"    # another class, measured anew
    assert choice.pool_forward(x, [1, 2]) == "fast"
    assert hasattr(choice, "pool_concat_forward") and not hasattr(choice, "upsample_into")
    assert choice.pool_concat_forward(x, [1, 2], 5) == "fast-only"

    def picky(x, *args):  # a candidate that declines fp64 (as the CUTLASS conv declines fp32)
        if x.dtype == torch.float64:
            raise NotImplementedError("not this dtype")
        return "picky"
    slow.conv_bias_act, fast.conv_bias_act = (lambda x, *args: "slow"), picky
    timings.update(picky=0.1)
    assert choice.conv_bias_act(x) == "picky"                         # measured, fastest
    assert choice.conv_bias_act(x.double()) == "slow"                 # declined: the other one is chosen
    slow.conv_bias_act = picky
    with pytest.raises(NotImplementedError, match="not this dtype"):  # declined by all: the error surfaces
        choice.conv_bias_act(x.double()[:, :, :5])
