"""Backbone conv + BN (+ residual) + ReLU: the op ``psp::conv_bias_act`` (reference / ATen-oneDNN on CPU, Triton
under the interpreter), BatchNorm folding (``psp_kernels.conv``) and the fused PSPNet backbone.

Oracle: ``conv2d -> batch_norm -> (+ residual) -> relu`` of PyTorch modules in fp64. fp64 agrees to 1e-12;
fp32/fp16/bf16 are judged against PyTorch's own error in that dtype (normwise, vs the fp64 oracle).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psp_kernels
from psp_kernels.conv import conv_bn_act, fold_bn, foldable
from psp_kernels.ops.conv import conv_bias_act

# (kernel, stride, padding, dilation): the dilated ResNet's convs (1x1 s1/s2, 3x3 s1/s2, 3x3 d2 / d4).
GEOMETRY = [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)]
# (N, C, O, H, W): odd map, channel counts not multiples of any block, N=1, map smaller than the dilation.
SHAPES = [(2, 24, 40, 13, 17), (1, 7, 5, 9, 6), (2, 16, 72, 5, 4)]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
       torch.bfloat16: torch.float32}


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    with psp_kernels.use_backend(request.param):
        yield request.param


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def make_inputs(n, c, o, h, w, k, stride, padding, dilation, dtype, layout, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(o, c, k, k, generator=g, dtype=torch.float64) / (c * k * k) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=fmt)
    bias = torch.randn(o, generator=g, dtype=torch.float64).to(ACC[dtype])
    ho, wo = ((s + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for s in (h, w))
    res = torch.randn(n, o, ho, wo, generator=g, dtype=torch.float64).to(dtype) if residual else None
    return x, weight, bias, res


def oracle(x, weight, bias, res, stride, padding, dilation, relu):
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation)
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


def nerr(t, ref):
    return ((t.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", GEOMETRY, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_op_matches_conv_chain_fp64(backend, shape, geometry, layout):
    n, c, o, h, w = shape
    k, stride, padding, dilation = geometry
    for residual, relu in ((True, True), (False, True), (False, False)):
        x, weight, bias, res = make_inputs(n, c, o, h, w, k, stride, padding, dilation, torch.float64, layout, residual)
        out = conv_bias_act(x, weight, bias, res, stride, padding, dilation, relu)
        ref = oracle(x, weight, bias, res, stride, padding, dilation, relu)
        assert out.shape == ref.shape and out.dtype == torch.float64
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
        assert nerr(out, ref) <= 1e-12, (residual, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 1, 2, 2), (3, 1, 4, 4)], ids=_id)
def test_op_low_precision_within_pytorchs_error(backend, geometry, dtype):
    k, stride, padding, dilation = geometry
    x, weight, bias, res = make_inputs(2, 24, 40, 13, 17, k, stride, padding, dilation, dtype, "channels_last")
    ref = oracle(x, weight, bias, res, stride, padding, dilation, True)
    eager = torch.relu(F.conv2d(x, weight, bias.to(dtype), stride, padding, dilation) + res)
    out = conv_bias_act(x, weight, bias, res, stride, padding, dilation, True)
    assert out.dtype == dtype
    # 3x for bf16 under the Triton interpreter, which rounds fp32 to bf16 by truncation
    factor = 3 if backend == "triton" and dtype == torch.bfloat16 else 2
    assert nerr(out, ref) <= factor * nerr(eager, ref) + TOL[dtype], (nerr(out, ref), nerr(eager, ref))


def test_op_is_deterministic_and_propagates_nan(backend):
    x, weight, bias, res = make_inputs(2, 24, 40, 13, 17, 3, 1, 2, 2, torch.float32, "channels_last")
    a = conv_bias_act(x, weight, bias, res, 1, 2, 2, True)
    b = conv_bias_act(x, weight, bias, res, 1, 2, 2, True)
    assert torch.equal(a, b)
    x[0, 3, 6, 8] = float("nan")
    out = conv_bias_act(x, weight, bias, res, 1, 2, 2, True)
    assert out[0, :, 6, 8].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 1, 2, 2)], ids=_id)
def test_op_gradcheck_and_opcheck(backend, geometry):
    k, stride, padding, dilation = geometry
    x, weight, bias, res = make_inputs(1, 3, 4, 7, 6, k, stride, padding, dilation, torch.float64, "channels_last")
    args = [t.requires_grad_() for t in (x, weight, bias, res)]
    assert torch.autograd.gradcheck(lambda *a: conv_bias_act(*a, stride, padding, dilation, True), args,
                                    fast_mode=True)
    torch.library.opcheck(torch.ops.psp.conv_bias_act.default, (x, weight, bias, res, stride, padding, dilation, True))
    torch.library.opcheck(torch.ops.psp.conv_bias_act.default,
                          (x, weight, None, None, stride, padding, dilation, False))


def test_op_rejects_bad_input():
    x = torch.randn(1, 4, 8, 8)
    cases = [((x, torch.randn(3, 5, 3, 3)), {}, ValueError, "weight must be"),
             ((x, torch.randn(3, 4, 3, 1)), {}, ValueError, "weight must be"),
             ((x, torch.randn(3, 4, 3, 3)), {"bias": torch.randn(4)}, ValueError, "bias must have shape"),
             ((x, torch.randn(3, 4, 3, 3)), {"residual": torch.randn(1, 3, 7, 7), "padding": 1}, ValueError,
              "residual must have shape"),
             ((x, torch.randn(3, 4, 3, 3)), {"dilation": 0}, ValueError, "dilation must be"),
             ((x, torch.randn(3, 4, 3, 3)), {"dilation": 4}, ValueError, "does not fit"),
             ((x.long(), torch.randn(3, 4, 3, 3)), {}, TypeError, "x must be"),
             ((x.double(), torch.randn(3, 4, 3, 3)), {}, TypeError, "weight must be float64")]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            conv_bias_act(*args, **kwargs)


# ---------------------------------------------------------------------------- BatchNorm folding

def make_pair(c, o, k, stride, padding, dilation, dtype=torch.float64, conv_bias=False):
    conv = nn.Conv2d(c, o, k, stride, padding, dilation, bias=conv_bias)
    bn = nn.BatchNorm2d(o)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
    return conv.to(dtype).to(memory_format=torch.channels_last), bn.to(dtype)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRY, ids=_id)
def test_folded_eval_matches_modules_fp64(backend, geometry, conv_bias):
    k, stride, padding, dilation = geometry
    conv, bn = make_pair(24, 40, k, stride, padding, dilation, conv_bias=conv_bias)
    conv.eval(), bn.eval()
    x = torch.randn(2, 24, 13, 17, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = bn(conv(x))
    res = torch.randn_like(y)
    with torch.no_grad():
        for relu, r in ((True, None), (True, res), (False, None)):
            expected = y + (r if r is not None else 0)
            expected = torch.relu(expected) if relu else expected
            assert nerr(conv_bn_act(x, conv, bn, relu=relu, residual=r), expected) <= 1e-12


def test_fold_cache_follows_parameter_and_statistics_changes():
    conv, bn = make_pair(8, 6, 3, 1, 2, 2)
    conv.eval(), bn.eval()
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = conv_bn_act(x, conv, bn)
        assert torch.equal(conv_bn_act(x, conv, bn), before)            # served from the cache
        bn.running_mean.add_(0.5)                                         # an in-place statistics change
        assert nerr(conv_bn_act(x, conv, bn), torch.relu(bn(conv(x)))) <= 1e-12
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        state["weight"].mul_(2)
        conv.load_state_dict(state)                                       # a checkpoint load
        assert nerr(conv_bn_act(x, conv, bn), torch.relu(bn(conv(x)))) <= 1e-12


def test_eval_with_gradients_reaches_every_parameter():
    conv, bn = make_pair(5, 4, 3, 1, 1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    ours = conv_bn_act(x, conv, bn)
    ours.square().sum().backward()
    got = [t.grad.clone() for t in (x, conv.weight, bn.weight, bn.bias)]
    for t in (x, conv.weight, bn.weight, bn.bias):
        t.grad = None
    torch.relu(bn(conv(x))).square().sum().backward()
    for g, t in zip(got, (x, conv.weight, bn.weight, bn.bias)):
        assert nerr(g, t.grad) <= 1e-12


def test_training_runs_the_modules_and_updates_running_statistics():
    conv, bn = make_pair(6, 5, 3, 1, 2, 2)
    twin_conv, twin_bn = make_pair(6, 5, 3, 1, 2, 2)
    twin_conv.load_state_dict(conv.state_dict()), twin_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    res = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    out = conv_bn_act(x, conv, bn, residual=res)
    expected = torch.relu(twin_bn(twin_conv(x)) + res)
    assert torch.equal(out, expected)
    for name, t in bn.state_dict().items():
        assert torch.equal(t, twin_bn.state_dict()[name]), name
    assert foldable(conv, bn) and not foldable(nn.Conv2d(6, 5, 3, groups=1, padding=(1, 2)), nn.BatchNorm2d(5))


def test_fold_bn_formula():
    conv, bn = make_pair(3, 2, 1, 1, 0, 1, conv_bias=True)
    weight, bias = fold_bn(conv, bn)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(weight, conv.weight * scale[:, None, None, None], rtol=1e-15, atol=0)
    torch.testing.assert_close(bias, bn.bias + (conv.bias - bn.running_mean) * scale, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------- the fused backbone

@pytest.mark.parametrize("layers", [18, 50])
def test_fused_pspnet_eval_matches_unfused_fp64(layers):
    from pspnet.models import PSPNet
    torch.manual_seed(0)
    fused = PSPNet(layers=layers, classes=5, fused=True)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    plain = PSPNet(layers=layers, classes=5, fused=False)
    plain.load_state_dict(fused.state_dict())
    fused, plain = fused.double().eval(), plain.double().eval()
    x = torch.randn(1, 3, 41, 37, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert nerr(fused(x), plain(x)) <= 1e-10
    assert fused.layer1[0].fused and not plain.layer1[0].fused


# ---------------------------------------------------------------------------- training: conv + statistics + BN

def train_oracle(x, weight, gamma, beta, res, stride, padding, dilation, relu, eps=1e-5):
    """nn.functional in fp64: conv, batch_norm with batch statistics, residual, ReLU."""
    y = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation)
    z = F.batch_norm(y, None, None, gamma.double(), beta.double(), training=True, eps=eps)
    if res is not None:
        z = z + res.double()
    return torch.relu(z) if relu else z


def make_train_inputs(n, c, o, h, w, geometry, dtype, layout, residual, seed=0):
    k, stride, padding, dilation = geometry
    x, weight, _, res = make_inputs(n, c, o, h, w, k, stride, padding, dilation, dtype, layout, residual, seed)
    g = torch.Generator().manual_seed(seed + 1)
    gamma = (torch.rand(o, generator=g, dtype=torch.float64) + 0.5).to(ACC[dtype])
    beta = torch.randn(o, generator=g, dtype=torch.float64).to(ACC[dtype])
    return x, weight, gamma, beta, res


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)], ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_train_op_matches_batchnorm_chain_fp64(backend, shape, geometry, layout):
    """Forward, every gradient and the running statistics against conv -> BatchNorm2d (train) -> add -> ReLU."""
    from psp_kernels.ops.conv import conv_bn_act_train
    n, c, o, h, w = shape
    k, stride, padding, dilation = geometry
    for residual, relu in ((True, True), (False, True), (False, False)):
        x, weight, gamma, beta, res = make_train_inputs(n, c, o, h, w, geometry, torch.float64, layout, residual)
        leaves = [t.requires_grad_() for t in (x, weight, gamma, beta) + ((res,) if residual else ())]
        rm, rv = torch.zeros(o, dtype=torch.float64), torch.ones(o, dtype=torch.float64)
        nbt = torch.zeros((), dtype=torch.long)
        out = conv_bn_act_train(x, weight, gamma, beta, rm, rv, res, stride, padding, dilation, relu,
                                num_batches_tracked=nbt)
        bn = nn.BatchNorm2d(o).double()
        with torch.no_grad():
            bn.weight.copy_(gamma), bn.bias.copy_(beta)
        ref = bn(F.conv2d(x, weight, None, stride, padding, dilation))
        ref = ref + res if residual else ref
        ref = torch.relu(ref) if relu else ref
        assert nerr(out, ref) <= 1e-12 and out.dtype == torch.float64
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(ref, [x, weight, bn.weight, bn.bias] + ([res] if residual else []), g)
        for name, a, b in zip(("x", "weight", "gamma", "beta", "residual"), got, want):
            assert nerr(a, b) <= 1e-11, (name, residual, relu, nerr(a, b))
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-12, atol=1e-15)
        assert int(nbt) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_train_op_low_precision_within_pytorchs_error(backend, dtype):
    from psp_kernels.ops.conv import conv_bn_act_train
    geometry = (3, 1, 2, 2)
    x, weight, gamma, beta, res = make_train_inputs(2, 24, 40, 13, 17, geometry, dtype, "channels_last", True)
    o = weight.shape[0]
    ref = train_oracle(x, weight, gamma, beta, res, 1, 2, 2, True)
    eager = torch.relu(F.batch_norm(F.conv2d(x, weight, None, 1, 2, 2), None, None, gamma.to(dtype), beta.to(dtype),
                                    training=True) + res)
    out = conv_bn_act_train(x, weight, gamma, beta, torch.zeros(o), torch.ones(o), res, 1, 2, 2, True)
    factor = 3 if backend == "triton" and dtype == torch.bfloat16 else 2
    assert out.dtype == dtype and nerr(out, ref) <= factor * nerr(eager, ref) + TOL[dtype]


def test_train_op_deterministic_gradcheck_opcheck_and_errors(backend):
    from psp_kernels.ops.conv import conv_bn_act_train
    x, weight, gamma, beta, res = make_train_inputs(2, 5, 4, 7, 6, (3, 1, 2, 2), torch.float64, "channels_last", True)
    stats = lambda: (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))  # noqa: E731
    a = conv_bn_act_train(x, weight, gamma, beta, *stats(), res, 1, 2, 2, True)
    assert torch.equal(a, conv_bn_act_train(x, weight, gamma, beta, *stats(), res, 1, 2, 2, True))
    leaves = [t.clone().requires_grad_() for t in (x, weight, gamma, beta, res)]
    assert torch.autograd.gradcheck(lambda *t: conv_bn_act_train(*t[:4], *stats(), t[4], 1, 2, 2, True), leaves,
                                    fast_mode=True)
    torch.library.opcheck(torch.ops.psp.conv_bn_act_train.default, (*leaves[:4], leaves[4], 1, 2, 2, True, 1e-5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        conv_bn_act_train(x[:1, :, :1, :1], weight[:, :, :1, :1], gamma, beta, *stats())
    with pytest.raises(ValueError, match="bn_weight must have shape"):
        conv_bn_act_train(x, weight, gamma[:3], beta, *stats())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bn_act_trains_fused_on_cuda_like_the_modules():
    conv, bn = make_pair(24, 40, 3, 1, 2, 2, dtype=torch.float32)
    conv, bn = conv.cuda(), bn.cuda()
    twin_conv, twin_bn = make_pair(24, 40, 3, 1, 2, 2, dtype=torch.float32)
    twin_conv, twin_bn = twin_conv.cuda(), twin_bn.cuda()
    twin_conv.load_state_dict(conv.state_dict()), twin_bn.load_state_dict(bn.state_dict())
    x = torch.randn(4, 24, 30, 30, device="cuda").contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(x, conv, bn)
    ref = torch.relu(twin_bn(twin_conv(x)))
    assert nerr(out, ref.double()) <= 1e-5
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, twin_bn.running_var, rtol=1e-5, atol=1e-6)


def test_conv_bn_act_compiles_fullgraph():
    """Eval-mode folding under torch.compile(fullgraph=True): the fold is traced (no cache lookups) and the op
    runs through its fake kernel; the result matches eager."""
    conv, bn = make_pair(8, 6, 3, 1, 2, 2, dtype=torch.float32)
    conv.eval(), bn.eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(lambda t: conv_bn_act(t, conv, bn), fullgraph=True)
    with torch.no_grad():
        assert nerr(compiled(x), torch.relu(bn(conv(x))).double()) <= 1e-6
