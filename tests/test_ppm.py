"""The whole pyramid pooling module on every backend: ``psp_kernels.PyramidPooling`` (psp_kernels/nn/ppm.py)
and the op ``psp::pyramid_pooling`` (psp_kernels/ops/ppm.py: pooling + copy of x into the concat, reduction,
upsampling into the concat; backward ``psp::pyramid_pooling_backward``).

Oracle: semseg's PPM (``reference.SemsegPPM``) in float64 with the same parameters and statistics, on the
same (upcast) input. float64: outputs and running statistics to 1e-12, gradients of x / the parameters to
1e-11 / 1e-10 (rtol). fp32 / fp16 / bf16: the one low-precision rule (tests/helpers.py), PyTorch's own
result being semseg's modules run in that dtype; one gradient, the conv weight's of a bin whose training
BatchNorm normalises two values per channel, is fp32 rounding noise and takes a larger factor (see
``TWO_VALUE_FACTOR``). Also: running statistics and momentum, NaN, N=1, bitwise determinism, the op against
the three separate ops, gradcheck, opcheck, torch.compile, and on a GPU the eval forward's launch count and
its CUDA-graph replay.
"""

from __future__ import annotations

import copy

import pytest
import torch

import psp_kernels
from helpers import assert_low_precision_close, assert_module_low_precision_close, make_ppm, make_x, rand
from psp_kernels import multibin_avg_pool, pyramid_pooling, reduction_conv_bn_relu, upsample_concat
from psp_kernels.reference import SemsegPPM

ops = torch.ops.psp
BINS = (1, 2, 3, 6)
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, bins). The Triton interpreter runs the first four (the CPU module tests' shapes: odd sizes,
# H, W below the largest bin, bins (1, 3, 5), nesting windows at 12x18); every other backend adds the GPU
# module tests' shapes: C = 64 on an odd map and a map below bin 6, the nesting maps of the 473 and 713
# crops (60x60, 90x90), and N = 1 (eval only: bin 1 has one value per channel in training).
INTERPRETED = [(2, 8, 13, 17, BINS), (2, 8, 5, 4, BINS), (2, 6, 12, 12, (1, 3, 5)), (2, 8, 12, 18, BINS)]
GPU_SHAPES = [(2, 64, 13, 17, BINS), (2, 64, 5, 4, BINS), (2, 256, 60, 60, BINS), (2, 128, 90, 90, BINS),
              (1, 256, 60, 60, BINS)]
CASES = INTERPRETED + GPU_SHAPES
LOW_INTERPRETED = INTERPRETED[:1]
LOW_CASES = LOW_INTERPRETED + GPU_SHAPES
LAYOUTS = ["nchw", "channels_last", "strided"]

# The conv-weight gradient of a bin b with N*b*b == 2 in training (bin 1 at N = 2), in fp32. BatchNorm of two
# values normalises them to about +-1: dz = w/sigma * (g - mean(g) - xhat * mean(g xhat)) is eps / (var + eps)
# times g's difference, obtained by cancelling terms of size |g| w / sigma, so every fp32 result of it,
# PyTorch's included, is rounding noise of one scale and its size is luck. On 2x8x13x17 (seed 0) eager's error
# is 2.11e-6 with 1 thread and 4.85e-6 with 2 (the C++ kernel's 9.97e-6 with any thread count): factor 2
# passes or fails with torch's thread count. Measured on CPU over 1000 random problems (C = 8 and 64, 13x17
# and 5x4, NCHW and channels_last, 1 and 2 threads): the error is 0.90-1.02x eager's (geometric mean) for the
# C++ kernel and 1.00-1.10x for ATen's own fp32 composition (the reference backend); both need a factor
# above 2 in 9-14% of the problems, at most 12.6 (C++) and 22.8 (ATen). fp16 / bf16 keep factor 2: eager
# rounds z to the input dtype where the kernels keep it in fp32 (factor needed <= 1.23 over 100 problems).
TWO_VALUE_FACTOR = 24.0
TWO_VALUE_REASON = ("training BatchNorm of 2 values per channel: this fp32 gradient is rounding noise; ATen's "
                    "own fp32 result needs up to 22.8x eager's error (TWO_VALUE_FACTOR)")


def case_id(case):
    return "x".join(map(str, case[:4])) + "-b" + "".join(map(str, case[4]))


def out_channels(module) -> int:
    return module.features[0][1].in_channels + len(module.features) * module.features[0][1].out_channels


def grad_factor(name: str, n: int, bins, training: bool, dtype: torch.dtype) -> dict:
    """The rule's keywords for the gradient of parameter ``name`` (``features.{k}.1.weight`` ...)."""
    k = int(name.split(".")[1])
    if name.endswith(".1.weight") and training and n * bins[k] ** 2 == 2 and dtype == torch.float32:
        return dict(factor=TWO_VALUE_FACTOR, reason=TWO_VALUE_REASON)
    return {}


def raises_one_value_per_channel(ours, n, c, h, w, dtype, device) -> None:
    """In training, N = 1 gives bin 1 one value per channel: BatchNorm's ValueError, as semseg's module."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours.train()(make_x(n, c, h, w, dtype, device=device))


def assert_equal_lists(first, second, what):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: result {i} differs"


# --------------------------------------------------------------------------------------------------
# The module against semseg's PPM
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.cases(CASES, interpreted=INTERPRETED, ids=case_id)
def test_module_matches_semseg_fp64(backend, case, layout, training):
    n, c, h, w, bins = case
    ours, ref = make_ppm(c, bins, device=backend.device)
    if training and n == 1:
        raises_one_value_per_channel(ours, n, c, h, w, torch.float64, backend.device)
        return
    ours.train(training), ref.train(training)
    x = make_x(n, c, h, w, layout=layout, device=backend.device)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, expected = ours(xa), ref(xb)
    assert out.shape == (n, out_channels(ours), h, w)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" and c > 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(expected)
    out.backward(g), expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.cases(LOW_CASES, interpreted=LOW_INTERPRETED, ids=case_id)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_module_low_precision(backend, dtype, case, layout, training):
    """Output, grad of x and parameter gradients by the low-precision rule. The oracle gets the module's
    rounded parameters and statistics as well as its rounded input: with the unrounded fp64 ones, the bf16
    rounding of the parameters moves a pre-activation across the ReLU's kink (1x256x60x60, bin 6: oracle
    -3.2e-4, ours +2.6e-5, eager -7.9e-6), and which side a result lands on is luck."""
    n, c, h, w, bins = case
    ours, oracle = make_ppm(c, bins, device=backend.device)
    eager = SemsegPPM(c, ours.features[0][1].out_channels, bins).to(backend.device)
    eager.load_state_dict(oracle.state_dict())
    ours, eager = ours.to(dtype), eager.to(dtype)
    oracle.load_state_dict(eager.state_dict())  # the oracle sees the rounded parameters and statistics too
    if training and n == 1:
        raises_one_value_per_channel(ours, n, c, h, w, dtype, backend.device)
        return
    for m in (ours, oracle, eager):
        m.train(training)
    assert_module_low_precision_close(ours, eager, oracle, make_x(n, c, h, w, layout=layout, device=backend.device),
                                      dtype)
    for (name, p), pe, po in zip(ours.named_parameters(), eager.parameters(), oracle.parameters()):
        assert_low_precision_close(p.grad, pe.grad, po.grad, f"grad {name}",
                                   **grad_factor(name, n, bins, training, dtype))


def test_module_n1_eval_60x60(backend):
    ours, ref = make_ppm(4, BINS, device=backend.device)
    ours.eval(), ref.eval()
    x = make_x(1, 4, 60, 60, device=backend.device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_module_running_stats_follow_batchnorm(backend):
    """Three fp32 training steps with momentum 0.3, then eval: buffers and outputs track nn.BatchNorm2d
    (semseg's fp32 modules are PyTorch's own result, the fp64 ones the oracle)."""
    ours, oracle = make_ppm(8, BINS, device=backend.device)
    ours, eager = ours.float(), copy.deepcopy(oracle).float()
    oracle.load_state_dict(eager.state_dict())  # the oracle sees the rounded parameters and statistics too
    for m in (ours, eager, oracle):
        for f in m.features:
            f[2].momentum = 0.3
    for _ in range(3):
        x = make_x(2, 8, 13, 17, torch.float32, device=backend.device)
        ours(x), eager(x), oracle(x.double())
    for (name, b), be, bo in zip(ours.named_buffers(), eager.buffers(), oracle.buffers()):
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(bo) == 3, name
        else:
            assert_low_precision_close(b, be, bo, name)
    for m in (ours, eager, oracle):
        m.eval()
    x = make_x(2, 8, 13, 17, torch.float32, device=backend.device)
    assert_low_precision_close(ours(x), eager(x), oracle(x.double()), "eval forward")


def test_module_cumulative_momentum(backend):
    ours, ref = make_ppm(8, BINS, device=backend.device)
    for m in (ours, ref):
        for f in m.features:
            f[2].momentum = None
    for _ in range(2):
        x = make_x(2, 8, 7, 9, device=backend.device)
        ours(x), ref(x)
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------------------------------
# NaN, N = 1, determinism
# --------------------------------------------------------------------------------------------------

def test_nan_propagates(backend):
    """A NaN in image 1 reaches every output the oracle makes NaN, and never image 0.

    The C++, CUDA and reference backends reproduce the oracle's NaN set exactly. The Triton pooling sums
    windows with 0/1-mask dot products, so a NaN also reaches the other cells of its (n, c) row
    (documented in psp_kernels/triton/pooling.py): a superset, still confined to its image.
    """
    ours, ref = make_ppm(8, BINS, device=backend.device)
    ours.eval(), ref.eval()
    x = make_x(2, 8, 13, 17, device=backend.device)
    x[1, 3, 4, 5] = float("nan")
    got, expected = torch.isnan(ours(x)), torch.isnan(ref(x))
    assert expected[1].any() and not got[0].any()
    assert got[expected].all()
    if backend.name != "triton":
        assert torch.equal(got, expected)


def test_one_value_per_channel_in_training_raises_like_pytorch(backend):
    ours, ref = make_ppm(8, BINS, device=backend.device)
    x = make_x(1, 8, 13, 17, device=backend.device)
    with pytest.raises(ValueError) as expected:
        ref(x)
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)
    ours.eval()
    assert ours(x).shape == (1, 16, 13, 17)  # N=1 is fine in eval


# (N, C, H, W): the CPU module test's problem; on the other backends also the GPU test's (channels_last
# 4x512x60x60, the 473 crop's map at semseg's channel ratio).
DETERMINISM_SMALL = (2, 8, 13, 17)


@pytest.mark.cases([DETERMINISM_SMALL, (4, 512, 60, 60)], interpreted=[DETERMINISM_SMALL],
                   ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_deterministic_bitwise(backend, dtype, case):
    """Three training forwards and backwards: output, grad of x and every parameter gradient bitwise equal."""
    n, c, h, w = case
    ours, _ = make_ppm(c, BINS, dtype, device=backend.device)
    x = make_x(n, c, h, w, dtype, "channels_last", backend.device)
    g = rand(n, out_channels(ours), h, w, dtype=dtype, seed=1, device=backend.device)
    runs = []
    for _ in range(2 if case == DETERMINISM_SMALL else 3):   # as the CPU and the GPU module test
        xi = x.clone().requires_grad_()
        ours.zero_grad()
        out = ours(xi)
        out.backward(g)
        runs.append([out, xi.grad] + [p.grad.clone() for p in ours.parameters()])
    for other in runs[1:]:
        assert_equal_lists(runs[0], other, "two runs")


def run_op(device, dtype, layout, training, case):
    """The whole-PPM op and its backward once on one fixed problem (the CUDA pipeline test's: parameters in
    the accumulation dtype); flat list of every result."""
    n, c, h, w, r = case
    bins, acc = list(BINS), torch.float32
    x = rand(n, c, h, w, dtype=dtype, seed=13, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def per_bin(seed, shape=(r,)):
        return [rand(*shape, dtype=acc, seed=seed + k, device=device) for k in range(len(bins))]
    ws = [w / c ** 0.5 for w in per_bin(17, (r, c, 1, 1))]
    bn = [[t.abs() + 0.5 for t in per_bin(31)], per_bin(41), [t * 0.1 for t in per_bin(51)],
          [t.abs() + 0.5 for t in per_bin(61)]]
    concat, pooled, bn_input, mean, var = ops.pyramid_pooling(x, ws, *bn, bins, training, 1e-5)
    g = rand(*concat.shape, dtype=dtype, seed=23, device=device)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    grads = ops.pyramid_pooling_backward(g, pooled, bn_input, ws, bn[0], bn[1], mean, var, bins, training, 1e-5,
                                         layout == "channels_last")
    return [concat, pooled, bn_input, mean, var, *grads]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.cases([(2, 64, 37, 45, 96)], interpreted=[(2, 8, 13, 17, 4)], ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_deterministic_bitwise(backend, dtype, case, layout, training):
    """psp::pyramid_pooling and its backward, twice: every result (concat, pooled, bn_input, statistics,
    grad of x, stacked parameter gradients) bitwise equal."""
    assert_equal_lists(run_op(backend.device, dtype, layout, training, case),
                       run_op(backend.device, dtype, layout, training, case), "two runs")


# --------------------------------------------------------------------------------------------------
# The op: against the three ops, gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------

def branch_params(c, r, bins, device, requires_grad=True):
    """Conv weights, BN weights and biases (leaves), running means and variances, fp64, per bin."""
    f64 = dict(dtype=torch.float64, device=device)
    params = [[torch.randn(r, c, 1, 1, **f64) for _ in bins], [torch.rand(r, **f64) + 0.5 for _ in bins],
              [torch.randn(r, **f64) for _ in bins]]
    params = [[t.requires_grad_(requires_grad) for t in group] for group in params]
    running = [[torch.randn(r, **f64) * 0.1 for _ in bins], [torch.rand(r, **f64) + 0.5 for _ in bins]]
    return params, running


def test_pyramid_pooling_op_equals_the_three_ops(backend):
    """The whole-PPM op (fused passes) and the three separate ops give the same forward and gradients."""
    n, c, r, bins = 2, 3, 2, BINS
    params, running = branch_params(c, r, bins, backend.device)
    for layout in ("nchw", "channels_last"):
        x = make_x(n, c, 12, 18, layout=layout, device=backend.device).requires_grad_()
        whole = pyramid_pooling(x, *params, *[[t.clone() for t in group] for group in running], bins, training=True)
        parts = upsample_concat(x, reduction_conv_bn_relu(multibin_avg_pool(x, bins), *params, *running, bins,
                                                          training=True), bins)
        torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(whole)
        flat = [x] + [p for group in params for p in group]
        for a, b in zip(torch.autograd.grad(whole, flat, g), torch.autograd.grad(parts, flat, g)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pyramid_pooling_gradcheck(backend):
    n, c, r, bins = 2, 2, 2, BINS
    x = make_x(n, c, 6, 6, layout="channels_last", device=backend.device).requires_grad_()
    (ws, gs, bs), (means, variances) = branch_params(c, r, bins, backend.device)
    k = len(bins)

    def f(t, *ts):
        return pyramid_pooling(t, ts[:k], ts[k:2 * k], ts[2 * k:], [v.clone() for v in means],
                               [v.clone() for v in variances], bins, training=True)
    assert torch.autograd.gradcheck(f, (x, *ws, *gs, *bs), fast_mode=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training, layout):
    bins = list(BINS)
    (ws, gs, bs), (means, variances) = branch_params(3, 2, bins, backend.device)
    x = make_x(2, 3, 6, 12, layout=layout, device=backend.device).requires_grad_()
    torch.library.opcheck(ops.pyramid_pooling.default, (x, ws, gs, bs, means, variances, bins, training, 1e-5))


def test_torch_compile_fullgraph_no_graph_break(backend):
    """The module under torch.compile(fullgraph=True), training: output, grad of x and running statistics
    by the low-precision rule against semseg's fp32 (PyTorch) and fp64 (oracle) modules."""
    ours, oracle = make_ppm(8, BINS, device=backend.device)
    ours, eager = ours.float(), copy.deepcopy(oracle).float()
    oracle.load_state_dict(eager.state_dict())  # the oracle sees the rounded parameters and statistics too
    compiled = torch.compile(ours, fullgraph=True)
    x = make_x(2, 8, 13, 17, torch.float32, device=backend.device).requires_grad_()
    xe, xo = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    out, out_eager, out_oracle = compiled(x), eager(xe), oracle(xo)
    for t in (out, out_eager, out_oracle):
        t.sum().backward()
    assert_low_precision_close(out, out_eager, out_oracle, "forward")
    assert_low_precision_close(x.grad, xe.grad, xo.grad, "grad x")
    for (name, b), be, bo in zip(ours.named_buffers(), eager.buffers(), oracle.buffers()):
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(bo) == 1, name
        else:
            assert_low_precision_close(b, be, bo, name)


# --------------------------------------------------------------------------------------------------
# On a GPU: launches of the eval forward, CUDA graphs
# --------------------------------------------------------------------------------------------------

# (C, x's dtype, parameters' dtype, layout): semseg's PPM (C = 2048) all bf16 (the compiled-Triton test), and
# C = 256 with bf16 x and fp32 parameters (the CUDA C++ test), NCHW and channels_last.
LAUNCH_CASES = [(2048, torch.bfloat16, torch.bfloat16, "nchw"), (256, torch.bfloat16, torch.float32, "nchw"),
                (256, torch.bfloat16, torch.float32, "channels_last")]


@pytest.mark.backends("triton", devices=("cpu",))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(24, 24), (13, 17)], ids=["nested-24x24", "general-13x17"])
def test_bytes_moved_within_the_byte_model(backend, layout, size):
    """The Triton kernels' loads and stores, counted in the interpreter (tests/byte_counter.py), against the
    PPM byte model (docs/ppm_byte_model.md; P = bytes of x, R = C/4 so the concat is 2P): the forward moves at
    most 3P of activation-sized tensors (x read once, the concat written once), the backward at most 3P
    (the branch half of the concat's gradient and its pass-through half read once, grad x written once).
    The small tensors (pooled maps, weights, branches at bin resolution, tables) stay in cache: the model
    leaves them out (at C=2048, 60x60 they are about 1 % of P); the message reports their distinct bytes."""
    from byte_counter import counting
    n, c = 2, 16
    ppm = make_ppm(c, BINS, dtype=torch.float32)[0]
    x = make_x(n, c, *size, dtype=torch.float32, layout=layout)
    p = x.numel() * x.element_size()

    def moved(launches):
        large, small = (sum(t) for t in zip(*(launch.traffic(p // 2) for launch in launches)))
        return large / p, small / p
    ppm.eval()
    with torch.no_grad(), counting() as launches:
        ppm(x)
    large, small = moved(launches)
    assert large <= 3.0, f"forward: {large:.3f}P activation-sized (+ {small:.3f}P small)"
    ppm.train()
    xg = x.clone().requires_grad_()
    out = ppm(xg)
    with counting() as launches:
        out.backward(torch.randn_like(out))
    large, small = moved(launches)
    assert large <= 3.0, f"backward: {large:.3f}P activation-sized (+ {small:.3f}P small)"


@pytest.mark.backends("triton", "cuda", devices=("cuda",))
@pytest.mark.cases(LAUNCH_CASES, interpreted=[], ids=lambda s: f"C{s[0]}-{str(s[2])[6:]}-{s[3]}")
def test_eval_forward_at_most_4_launches(backend, case):
    """The N = 1 eval forward (pooling + concat copy, reduction, upsampling into the concat, and the Triton
    launchers' one parameter pack) takes at most 4 device operations, none a host-device copy; its result
    follows the low-precision rule (PyTorch's own: the reference backend on the same inputs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    c, dtype, param_dtype, layout = case
    ours, oracle = make_ppm(c, BINS, param_dtype, device="cuda")
    ours.eval(), oracle.eval()
    x = make_x(1, c, 60, 60, dtype, layout, "cuda")
    with torch.no_grad():
        ours(x)                                  # warm-up: compilation, cached tables
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = ours(x)
            torch.cuda.synchronize()
        events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernels = [name for name in events if not name.startswith(("Memcpy", "Memset"))]
        copies = [name for name in events if name.startswith("Memcpy")]
        assert 1 <= len(kernels) and len(events) <= 4, events
        assert not copies, copies
        with psp_kernels.use_backend("reference", "cuda"):
            pytorch = ours(x)
        expected = oracle.double()(x.double())
    assert_low_precision_close(got, pytorch, expected, "eval forward")


# (C, dtype, layout): the compiled-Triton test's bf16 module, the CUDA C++ test's fp32 channels_last one.
GRAPH_CASES = [(256, torch.bfloat16, "nchw"), (32, torch.float32, "channels_last")]


@pytest.mark.backends("triton", "cuda", devices=("cuda",))
@pytest.mark.cases(GRAPH_CASES, interpreted=[], ids=lambda s: f"C{s[0]}-{str(s[1])[6:]}-{s[2]}")
def test_eval_forward_cuda_graph(backend, case):
    """The N = 1 eval forward captured in a CUDA graph: a replay on new input equals the eager forward."""
    c, dtype, layout = case
    ours, _ = make_ppm(c, BINS, dtype, device="cuda")
    ours.eval()
    static_x = make_x(1, c, 60, 60, dtype, layout, "cuda")
    with torch.no_grad():
        first = ours(static_x)                   # compilation, cached tables
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):            # warm-up on a side stream, as the CUDA-graph docs ask
            ours(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ours(static_x)
        new_x = make_x(1, c, 60, 60, dtype, layout, "cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ours(new_x))
        assert not torch.equal(static_out, first)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def _params(c=3, r=2, bins=BINS):
    return [[torch.randn(r, c, 1, 1) for _ in bins], [torch.ones(r) for _ in bins], [torch.zeros(r) for _ in bins],
            [torch.zeros(r) for _ in bins], [torch.ones(r) for _ in bins]]


def _no_affine_module():
    module = psp_kernels.PyramidPooling(8, 2)
    module.features[0][2] = torch.nn.BatchNorm2d(2, affine=False)
    return module


@pytest.mark.parametrize("call, error, match", [
    (lambda: psp_kernels.PyramidPooling(0, 2), ValueError, "in_channels must be a positive int"),
    (lambda: psp_kernels.PyramidPooling(8, 0), ValueError, "reduction_channels must be a positive int"),
    (lambda: psp_kernels.PyramidPooling(8, 2, bins=(1, 1)), ValueError, "bins must not repeat"),
    (lambda: _no_affine_module()(torch.randn(2, 8, 5, 5)), NotImplementedError, "affine=True"),
    (lambda: pyramid_pooling(torch.randn(3, 5, 5), *_params()), ValueError, "x must be 4-D"),
    (lambda: pyramid_pooling(torch.randn(2, 4, 5, 5), *_params()), ValueError,
     r"conv_weights\[0\] must have shape \(2, 4, 1, 1\)"),
    (lambda: pyramid_pooling(torch.randn(2, 3, 5, 5), *_params()[:4], torch.ones(4, 2)), TypeError,
     "running_vars must be a list"),
    (lambda: pyramid_pooling(torch.randn(1, 3, 5, 5), *_params(), training=True), ValueError,
     "Expected more than 1 value per channel when training"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
