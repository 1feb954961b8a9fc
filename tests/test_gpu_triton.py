"""Compiled Triton kernels on a CUDA GPU: parity with semseg's PPM, determinism, launch count, CUDA graphs.

These need a GPU and compiled (not interpreted) Triton. The CPU suite runs Triton in the interpreter
(``TRITON_INTERPRET=1``, set by conftest.py unless already set), so on a GPU machine run

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu_triton.py tests/test_cuda.py -q
"""

from __future__ import annotations

import pytest
import torch

import psp_kernels
from psp_kernels.reference import SemsegPPM
from psp_kernels.triton.common import interpreting

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(interpreting(), reason="needs compiled Triton: run with TRITON_INTERPRET=0 on a GPU machine"),
]

# (N, C, H, W): odd map, map smaller than bin 6, nesting maps of the 473 / 713 crops, N=1.
SHAPES = [(2, 64, 13, 17), (2, 64, 5, 4), (2, 256, 60, 60), (2, 128, 90, 90), (1, 256, 60, 60)]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}   # rel. error vs fp64 (norm ratio)


def _ppm(c, dtype, device="cuda"):
    ref = SemsegPPM(c, c // 4, (1, 2, 3, 6))
    with torch.no_grad():
        for f in ref.features:
            f[2].weight.uniform_(0.5, 1.5), f[2].bias.uniform_(-0.5, 0.5)
            f[2].running_mean.uniform_(-0.1, 0.1), f[2].running_var.uniform_(0.5, 2.0)
    ours = psp_kernels.PyramidPooling(c, c // 4)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device, dtype), ref.to(device, torch.float64)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _triton_backend():
    with psp_kernels.use_backend("triton"):
        yield


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_semseg(shape, dtype, channels_last, training):
    n, c, h, w = shape
    ours, oracle = _ppm(c, dtype)
    if training and n == 1:     # bin 1 has one value per channel: BatchNorm's error, as semseg's module
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ours.train()(torch.randn(n, c, h, w, device="cuda", dtype=dtype))
        return
    ours.train(training), oracle.train(training)
    x64 = torch.randn(n, c, h, w, device="cuda", dtype=torch.float64)
    if channels_last:
        x64 = x64.contiguous(memory_format=torch.channels_last)
    x = x64.to(dtype).requires_grad_()
    xo = x.detach().double().requires_grad_()
    out, expected = ours(x), oracle(xo)
    g = torch.randn_like(expected)
    out.backward(g.to(dtype)), expected.backward(g.to(dtype).double())
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    assert _rel(out, expected) <= tol
    assert _rel(x.grad, xo.grad) <= tol
    for (name, p), q in zip(ours.named_parameters(), oracle.parameters()):
        assert _rel(p.grad, q.grad) <= tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    ours, _ = _ppm(512, dtype)
    x = torch.randn(4, 512, 60, 60, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 1024, 60, 60, device="cuda", dtype=dtype)
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        ours.zero_grad()
        out = ours(xi)
        out.backward(g)
        runs.append([out, xi.grad] + [p.grad.clone() for p in ours.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_eval_forward_n1_at_most_4_launches():
    ours, _ = _ppm(2048, torch.bfloat16)
    ours.eval()
    x = torch.randn(1, 2048, 60, 60, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ours(x)                                  # warm-up: compilation, cached tables
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours(x)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 4, [e.name for e in kernels]


def test_cuda_graph_replay_matches_eager():
    ours, _ = _ppm(256, torch.bfloat16)
    ours.eval()
    static_x = torch.randn(1, 256, 60, 60, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ours(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ours(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ours(new_x))
        assert not torch.equal(static_out, expected)


# --------------------------------------------------------------------------------------------------
# The concat-free head: the compiled head_bn_relu kernels and the whole PSPHead
# --------------------------------------------------------------------------------------------------

HEAD_SHAPES = [(2, 512, 60, 60, 36), (16, 512, 90, 90, 36), (1, 40, 5, 4, 9), (2, 33, 13, 70, 36)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_head_epilogue_matches_reference(shape, dtype, layout, training):
    """Compiled head_forward / head_backward against the reference: fp64 1e-12, fp32 1e-5 (max-normalised),
    fp16/bf16 normwise within 2x the reference's own error vs fp64."""
    from psp_kernels import reference as ref
    from psp_kernels import triton as tri
    from test_head import normwise, op_inputs
    y, u, bw, bn = [t.cuda() if isinstance(t, torch.Tensor) else [v.cuda() for v in t]
                    for t in op_inputs(shape, dtype, layout)]
    g = torch.randn(y.shape, device="cuda").to(dtype)
    got = tri.head_forward(y, u, bw, *bn, training, 1e-5, True)
    exp = ref.head_forward(y, u, bw, *bn, training, 1e-5, True)
    back = tri.head_backward(g, exp[1], bw, bn[0], bn[1], exp[2], exp[3], training, 1e-5)
    back_ref = ref.head_backward(g, exp[1], bw, bn[0], bn[1], exp[2], exp[3], training, 1e-5)
    assert got[0].stride() == exp[0].stride() and back[0].stride() == back_ref[0].stride()
    if dtype in (torch.float64, torch.float32):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in [*zip(got, exp), *zip(back, back_ref)]:
            assert ((a - b).abs().max() / b.abs().max()).item() <= tol
        return
    oracle = ref.head_forward(y.double(), u.double(), bw.double(), *[t.double() for t in bn], training, 1e-5, True)
    back_o = ref.head_backward(g.double(), exp[1].double(), bw.double(), bn[0].double(), bn[1].double(),
                               exp[2].double(), exp[3].double(), training, 1e-5)
    for a, b, o in [*list(zip(got, exp, oracle))[:2], *zip(back, back_ref, back_o)]:
        assert normwise(a, o) <= 2 * normwise(b, o) + 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_psp_head_matches_concat_head(dtype, training):
    """PSPHead (HeadConv, Triton PPM and epilogue) against the fp64 concat head, output and grad of x."""
    from test_head import make_heads
    ours, oracle = make_heads(256, torch.float64, out=64)
    ours, oracle = ours.cuda().to(dtype), oracle.cuda()
    ours.train(training), oracle.train(training)
    x = torch.randn(2, 256, 60, 60, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    xa, xo = x.clone().requires_grad_(), x.double().requires_grad_()
    out, expected = ours(xa), oracle(xo)
    g = torch.randn_like(expected)
    out.backward(g.to(dtype)), expected.backward(g)
    assert _rel(out, expected) <= TOL[dtype] and _rel(xa.grad, xo.grad) <= TOL[dtype]
