"""The backbone conv ops on every backend: ``psp::folded_conv`` (conv + bias + residual + ReLU, BatchNorm
folded; cpp / reference / Triton on CPU, CUTLASS / Triton / reference and the eager default on CUDA) with its
backward ``psp::folded_conv_backward`` (ATen), ``psp::training_conv`` (conv + batch statistics + BatchNorm +
residual + ReLU; reference / Triton, eager on CUDA) with ``psp::training_conv_bn_backward``; the eager
candidate (cuDNN / oneDNN in x's dtype, called directly); the module helpers of ``psp_kernels.nn.conv``
(fold_bn, foldable, fused_conv_bn, fused_conv_bn_sequence) and the fused PSPNet backbone.

Oracle: ``conv2d -> batch_norm -> (+ residual) -> relu`` of PyTorch functions / modules in float64. float64
agrees to 1e-12 (normwise; gradients 1e-11, the whole PSPNet 1e-10); fp32/fp16/bf16 follow the one
low-precision rule (tests/helpers.py, max-abs), PyTorch's own error being the reference op's on the same
low-precision inputs (fp32 accumulation, rounded once) or, for modules, the modules in that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_bitwise, assert_low_precision_close, memory_format, requires_cuda
from psp_kernels import eager, folded_conv, reference, training_conv
from psp_kernels.geometry import acc_dtype
from psp_kernels.nn.conv import fold_bn, foldable, fused_conv_bn, fused_conv_bn_sequence

ops = torch.ops.psp
LOW = [torch.float32, torch.float16, torch.bfloat16]
# (kernel, stride, padding, dilation): the dilated ResNet's convs (1x1 s1/s2, 3x3 s1/s2, 3x3 d2 / d4).
GEOMETRY = [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)]
TRAIN_GEOMETRY = [(1, 1, 0, 1), (1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)]
# (N, C, O, H, W): odd map, channel counts not multiples of any block, N=1, map smaller than the dilation.
SHAPES = [(2, 24, 40, 13, 17), (1, 7, 5, 9, 6), (2, 16, 72, 5, 4)]
# (residual, relu): a bottleneck's end, conv + BN + ReLU, a downsample.
EPILOGUES = ((True, True), (False, True), (False, False))
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
#: training_conv has no C++ kernel: cpu-cpp would repeat cpu-reference; on cuda-cuda the table runs the
#: op's CUDA default, eager (cuDNN), through the op and its autograd.
training_backends = pytest.mark.backends("reference", "triton", "cuda")


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def make_inputs(n, c, o, h, w, k, stride, padding, dilation, dtype, layout, residual=True, seed=0, device="cpu"):
    """x [N, C, H, W], weight [O, C, k, k] (x's dtype, scaled to unit output variance), bias [O] (the
    accumulation dtype, as a folded BatchNorm's) and the residual [N, O, Ho, Wo] or None, in ``layout``."""
    g = torch.Generator().manual_seed(seed)
    fmt = memory_format(layout == "channels_last")
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(o, c, k, k, generator=g, dtype=torch.float64) / (c * k * k) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=fmt)
    bias = torch.randn(o, generator=g, dtype=torch.float64).to(acc_dtype(dtype))
    ho, wo = ((s + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for s in (h, w))
    res = torch.randn(n, o, ho, wo, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt) \
        if residual else None
    return tuple(None if t is None else t.to(device) for t in (x, weight, bias, res))


def oracle(x, weight, bias, res, stride, padding, dilation, relu):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation)
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


def nerr(t, ref):
    return ((t.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------------
# psp::folded_conv against the oracle
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", GEOMETRY, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_folded_conv_matches_conv_chain_fp64(backend, shape, geometry, layout):
    """float64 (the CUTLASS candidate declines it: on cuda-cuda the table runs the next candidate)."""
    n, c, o, h, w = shape
    k, stride, padding, dilation = geometry
    for residual, relu in EPILOGUES:
        x, weight, bias, res = make_inputs(n, c, o, h, w, k, stride, padding, dilation, torch.float64, layout,
                                           residual, device=backend.device)
        out = folded_conv(x, weight, bias, res, stride, padding, dilation, relu)
        ref = oracle(x, weight, bias, res, stride, padding, dilation, relu)
        assert out.shape == ref.shape and out.dtype == torch.float64
        assert out.is_contiguous(memory_format=memory_format(layout == "channels_last"))
        assert nerr(out, ref) <= 1e-12, (residual, relu)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 1, 2, 2), (3, 1, 4, 4)], ids=_id)
@pytest.mark.parametrize("c", [24, 40])
def test_folded_conv_low_precision(backend, c, geometry, dtype):
    """fp32/fp16/bf16, channels_last, C and O multiples of 8 (on cuda-cuda CUTLASS runs fp16/bf16); C=24 takes
    Triton's packed (tap, channel) K walk for 3x3, C=40 its channel slices (two per tap, the second partial)."""
    k, stride, padding, dilation = geometry
    x, weight, bias, res = make_inputs(2, c, 40, 13, 17, k, stride, padding, dilation, dtype, "channels_last",
                                       device=backend.device)
    args = (x, weight, bias, res, stride, padding, dilation, True)
    out = folded_conv(*args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_low_precision_close(out, reference.folded_conv(*args), oracle(*args), "folded_conv")


def test_folded_conv_is_deterministic_and_propagates_nan(backend):
    x, weight, bias, res = make_inputs(2, 24, 40, 13, 17, 3, 1, 2, 2, torch.float32, "channels_last",
                                       device=backend.device)
    a = folded_conv(x, weight, bias, res, 1, 2, 2, True)
    assert torch.equal(a, folded_conv(x, weight, bias, res, 1, 2, 2, True))
    x[0, 3, 6, 8] = float("nan")
    out = folded_conv(x, weight, bias, res, 1, 2, 2, True)
    assert out[0, :, 6, 8].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 1, 2, 2)], ids=_id)
def test_folded_conv_gradcheck_and_opcheck(backend, geometry):
    k, stride, padding, dilation = geometry
    x, weight, bias, res = make_inputs(1, 3, 4, 7, 6, k, stride, padding, dilation, torch.float64, "channels_last",
                                       device=backend.device)
    args = [t.requires_grad_() for t in (x, weight, bias, res)]
    # The backward is ATen's convolution backward; on CUDA, cuDNN's default weight-gradient algorithms are not
    # reentrant (gradcheck runs backward twice), so this checks the math with cuDNN's deterministic ones.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        assert torch.autograd.gradcheck(lambda *a: folded_conv(*a, stride, padding, dilation, True), args,
                                        fast_mode=True)
    torch.library.opcheck(ops.folded_conv.default, (x, weight, bias, res, stride, padding, dilation, True))
    torch.library.opcheck(ops.folded_conv.default, (x, weight, None, None, stride, padding, dilation, False))


@pytest.mark.parametrize("mask", [(True, True, True, True), (True, False, False, False), (False, True, True, False),
                                  (False, False, False, True)], ids=lambda m: "".join("xwbr"[i] for i in range(4)
                                                                                      if m[i]))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("device", DEVICES)
def test_folded_conv_backward(device, relu, mask):
    """``psp::folded_conv_backward`` (ATen; the only candidate on both devices) against the oracle's autograd
    in float64; what ``output_mask`` leaves out comes back empty."""
    k, stride, padding, dilation = 3, 2, 2, 2
    x, weight, bias, res = make_inputs(2, 5, 6, 11, 9, k, stride, padding, dilation, torch.float64, "channels_last",
                                       device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, res)]
    ref = oracle(*leaves, stride, padding, dilation, relu)
    g = torch.randn(ref.shape, dtype=torch.float64).to(device)
    want = torch.autograd.grad(ref, leaves, g)
    out = ref.detach()
    got = ops.folded_conv_backward(g, x.detach(), weight.detach(), out, stride, padding, dilation, relu, list(mask))
    for name, m, a, b in zip(("x", "weight", "bias", "residual"), mask, got, want):
        if m:
            assert a.shape == b.shape and nerr(a, b) <= 1e-12, name
        else:
            assert a.numel() == 0, name


def test_folded_conv_rejects_bad_input():
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
            folded_conv(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# The CUTLASS candidate (csrc/cuda/conv.cu): what it covers, and what it declines
# --------------------------------------------------------------------------------------------------

def cutlass_inputs(dtype, k, stride, padding, dilation, residual_dtype=None):
    cl = torch.channels_last
    x = torch.randn(2, 64, 29, 31, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(72, 64, k, k, device="cuda", dtype=dtype) / (64 * k * k) ** 0.5).contiguous(memory_format=cl)
    b = torch.randn(72, device="cuda")
    ho, wo = ((s + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for s in (29, 31))
    res = torch.randn(2, 72, ho, wo, device="cuda", dtype=residual_dtype or dtype).contiguous(memory_format=cl)
    return x, w, b, res


@pytest.mark.backends("cuda", devices=("cuda",))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)],
                         ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_cutlass_folded_conv(backend, dtype, geometry):
    """The CUTLASS kernel itself (``torch.ops.psp_native``) at stride 1/2, dilation 1/2/4; the op under the
    ``cuda`` backend runs it (bitwise the same), deterministically."""
    k, stride, padding, dilation = geometry
    x, w, b, res = cutlass_inputs(dtype, k, stride, padding, dilation)
    for r, relu in ((res, True), (None, True), (None, False)):
        args = (x, w, b, r, stride, padding, dilation, relu)
        out = torch.ops.psp_native.folded_conv(*args)
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        assert_low_precision_close(out, reference.folded_conv(*args), oracle(*args), f"CUTLASS {geometry} {relu}")
        assert torch.equal(out, torch.ops.psp_native.folded_conv(*args))
        assert torch.equal(out, ops.folded_conv(*args))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A channels_last copy of ``t`` whose data starts one element (2 bytes) past a 16-byte boundary."""
    n, c, h, w = t.shape
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.data_ptr() % 16 != 0
    return out


@pytest.mark.backends("cuda", devices=("cuda",))
def test_cutlass_declines_what_it_does_not_cover(backend):
    """The CUTLASS kernel raises NotImplementedError for inputs it does not cover (fp32, C or O not a
    multiple of 8, a residual of another dtype than x, x or the residual not 16-byte aligned); through the
    op the kernel table then runs the next candidate (eager), bitwise."""
    native = torch.ops.psp_native.folded_conv
    x32 = torch.randn(1, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    w32 = torch.randn(64, 64, 3, 3, device="cuda")
    x, w, b, res = cutlass_inputs(torch.float16, 3, 1, 1, 1)
    declined = [
        ((x32, w32, torch.zeros(64, device="cuda"), None), "float16/bfloat16"),
        ((x32[:, :3].half().contiguous(memory_format=torch.channels_last), w32[:, :3].half(),
          torch.zeros(64, device="cuda"), None), "multiples of 8"),
        ((x, w, b, res.float()), "residual of x's dtype"),
        ((misaligned(x), w, b, res), "16-byte aligned"),
        ((x, w, b, misaligned(res)), "16-byte aligned"),
    ]
    for tensors, match in declined:
        args = (*tensors, 1, 1, 1, True)
        with pytest.raises(NotImplementedError, match=match):
            native(*args)
        assert torch.equal(ops.folded_conv(*args), eager.folded_conv(*args)), match


@pytest.mark.backends("cuda", devices=("cuda",))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cutlass_propagates_nan(backend, dtype):
    """ReLU propagates a NaN (``torch.relu``'s contract, the op's docstring) in the CUTLASS epilogue too."""
    x, w, b, res = cutlass_inputs(dtype, 3, 1, 2, 2)
    x[0, 3, 6, 8] = float("nan")
    out = torch.ops.psp_native.folded_conv(x, w, b, res, 1, 2, 2, True)
    assert out[0, :, 6, 8].isnan().all() and not out[1].isnan().any()


# --------------------------------------------------------------------------------------------------
# The eager candidate (psp_kernels.eager: cuDNN / oneDNN in x's dtype), called directly on both devices
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 4, 4)], ids=_id)
@pytest.mark.parametrize("device", DEVICES)
def test_eager_fp64(device, geometry):
    k, stride, padding, dilation = geometry
    for layout in ("nchw", "channels_last"):
        for residual, relu in EPILOGUES:
            x, weight, bias, res = make_inputs(2, 24, 40, 13, 17, k, stride, padding, dilation, torch.float64, layout,
                                               residual, device=device)
            args = (x, weight, bias, res, stride, padding, dilation, relu)
            out = eager.folded_conv(*args)
            assert out.is_contiguous(memory_format=memory_format(layout == "channels_last"))
            assert nerr(out, oracle(*args)) <= 1e-12
            bn_weight, bn_bias = bn_params(40, torch.float64, device=device)
            out, y, mean, var = eager.training_conv(x, weight, bn_weight, bn_bias, res, stride, padding, dilation,
                                                    relu, 1e-5)
            assert out.is_contiguous(memory_format=memory_format(layout == "channels_last"))
            assert y.dtype == torch.float64
            assert nerr(out, train_oracle(x, weight, bn_weight, bn_bias, res, stride, padding, dilation, relu)) <= 1e-12


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("geometry", [(1, 2, 0, 1), (3, 1, 2, 2), (3, 1, 4, 4)], ids=_id)
@pytest.mark.parametrize("device", DEVICES)
def test_eager_low_precision(device, geometry, dtype):
    k, stride, padding, dilation = geometry
    x, weight, bias, res = make_inputs(2, 24, 40, 13, 17, k, stride, padding, dilation, dtype, "channels_last",
                                       device=device)
    args = (x, weight, bias, res, stride, padding, dilation, True)
    out = eager.folded_conv(*args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_low_precision_close(out, reference.folded_conv(*args), oracle(*args), "eager folded_conv")
    bn_weight, bn_bias = bn_params(40, dtype, device=device)
    train_args = (x, weight, bn_weight, bn_bias, res, stride, padding, dilation, True, 1e-5)
    got, want = eager.training_conv(*train_args), reference.training_conv(*train_args)
    assert got[0].dtype == dtype
    assert_low_precision_close(got[0], want[0], train_oracle(*train_args[:-1]), "eager training_conv")
    y64 = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    assert_low_precision_close(got[2], want[2], mean64, "eager mean", dtype=dtype)
    assert_low_precision_close(got[3], want[3], var64, "eager var", dtype=dtype)


# --------------------------------------------------------------------------------------------------
# BatchNorm folding: psp_kernels.nn.conv
# --------------------------------------------------------------------------------------------------

def make_pair(c, o, k, stride, padding, dilation, dtype=torch.float64, conv_bias=False, device="cpu"):
    conv = nn.Conv2d(c, o, k, stride, padding, dilation, bias=conv_bias)
    bn = nn.BatchNorm2d(o)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
    return conv.to(device, dtype).to(memory_format=torch.channels_last), bn.to(device, dtype)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRY, ids=_id)
def test_folded_eval_matches_modules_fp64(backend, geometry, conv_bias):
    k, stride, padding, dilation = geometry
    conv, bn = make_pair(24, 40, k, stride, padding, dilation, conv_bias=conv_bias, device=backend.device)
    conv.eval(), bn.eval()
    x = torch.randn(2, 24, 13, 17, dtype=torch.float64).to(backend.device).contiguous(memory_format=torch.channels_last)
    y = bn(conv(x))
    res = torch.randn_like(y)
    with torch.no_grad():
        for relu, r in ((True, None), (True, res), (False, None)):
            expected = y + (r if r is not None else 0)
            expected = torch.relu(expected) if relu else expected
            assert nerr(fused_conv_bn(x, conv, bn, relu=relu, residual=r), expected) <= 1e-12


def test_fold_cache_follows_parameter_and_statistics_changes():
    conv, bn = make_pair(8, 6, 3, 1, 2, 2)
    conv.eval(), bn.eval()
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = fused_conv_bn(x, conv, bn)
        assert torch.equal(fused_conv_bn(x, conv, bn), before)            # served from the cache
        bn.running_mean.add_(0.5)                                         # an in-place statistics change
        assert nerr(fused_conv_bn(x, conv, bn), torch.relu(bn(conv(x)))) <= 1e-12
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        state["weight"].mul_(2)
        conv.load_state_dict(state)                                       # a checkpoint load
        assert nerr(fused_conv_bn(x, conv, bn), torch.relu(bn(conv(x)))) <= 1e-12


def test_eval_with_gradients_reaches_every_parameter():
    conv, bn = make_pair(5, 4, 3, 1, 1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    ours = fused_conv_bn(x, conv, bn)
    ours.square().sum().backward()
    got = [t.grad.clone() for t in (x, conv.weight, bn.weight, bn.bias)]
    for t in (x, conv.weight, bn.weight, bn.bias):
        t.grad = None
    torch.relu(bn(conv(x))).square().sum().backward()
    for g, t in zip(got, (x, conv.weight, bn.weight, bn.bias)):
        assert nerr(g, t.grad) <= 1e-12


def test_training_runs_the_modules_and_updates_running_statistics():
    """On CPU, training runs the modules themselves (bitwise), running statistics included."""
    conv, bn = make_pair(6, 5, 3, 1, 2, 2)
    twin_conv, twin_bn = make_pair(6, 5, 3, 1, 2, 2)
    twin_conv.load_state_dict(conv.state_dict()), twin_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    res = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    out = fused_conv_bn(x, conv, bn, residual=res)
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


def test_fused_sequence_matches_the_modules_fp64(backend):
    """semseg's deep stem (conv, BN, ReLU x 3, then max-pool) and a downsample (conv, BN): each (conv, BN[,
    ReLU]) run is one fused op in eval mode."""
    dev = backend.device
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
    stem = stem.to(dev, torch.float64).eval()
    x = torch.randn(2, 3, 17, 15, dtype=torch.float64).to(dev).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert nerr(fused_conv_bn_sequence(stem, x), stem(x)) <= 1e-12


def test_fused_conv_bn_compiles_fullgraph():
    """Eval-mode folding under torch.compile(fullgraph=True): the fold is traced (no cache lookups) and the op
    runs through its fake kernel; the result matches the modules' (fp32, the low-precision rule)."""
    conv, bn = make_pair(8, 6, 3, 1, 2, 2, dtype=torch.float32)
    conv.eval(), bn.eval()
    conv64, bn64 = make_pair(8, 6, 3, 1, 2, 2)
    conv64.load_state_dict(conv.state_dict()), bn64.load_state_dict(bn.state_dict())
    conv64.eval(), bn64.eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(lambda t: fused_conv_bn(t, conv, bn), fullgraph=True)
    with torch.no_grad():
        assert_low_precision_close(compiled(x), torch.relu(bn(conv(x))), torch.relu(bn64(conv64(x.double()))),
                                   "compiled fused_conv_bn")


# --------------------------------------------------------------------------------------------------
# The fused PSPNet backbone
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [dict(fused=True), dict(fused=False, fused_backbone=True)],
                         ids=["fused", "fused_backbone"])
@pytest.mark.parametrize("layers", [18, 50])
def test_fused_pspnet_eval_matches_unfused_fp64(layers, switches):
    from pspnet.models import PSPNet
    torch.manual_seed(0)
    fused = PSPNet(layers=layers, classes=5, **switches)
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
    assert fused.fused_ppm == switches["fused"] and fused.concat_free_head == switches["fused"]


# --------------------------------------------------------------------------------------------------
# psp::training_conv (+ psp::training_conv_bn_backward): conv + batch statistics + BatchNorm + residual + ReLU
# --------------------------------------------------------------------------------------------------

def bn_params(o, dtype, seed=1, device="cpu"):
    """BatchNorm weight in [0.5, 1.5) and bias ~ N(0, 1), in the accumulation dtype."""
    g = torch.Generator().manual_seed(seed)
    bn_weight = (torch.rand(o, generator=g, dtype=torch.float64) + 0.5).to(acc_dtype(dtype))
    bn_bias = torch.randn(o, generator=g, dtype=torch.float64).to(acc_dtype(dtype))
    return bn_weight.to(device), bn_bias.to(device)


def train_oracle(x, weight, bn_weight, bn_bias, res, stride, padding, dilation, relu, eps=1e-5):
    """nn.functional in fp64: conv, batch_norm with batch statistics, residual, ReLU."""
    y = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation)
    z = F.batch_norm(y, None, None, bn_weight.double(), bn_bias.double(), training=True, eps=eps)
    if res is not None:
        z = z + res.double()
    return torch.relu(z) if relu else z


def make_train_inputs(n, c, o, h, w, geometry, dtype, layout, residual, seed=0, device="cpu"):
    k, stride, padding, dilation = geometry
    x, weight, _, res = make_inputs(n, c, o, h, w, k, stride, padding, dilation, dtype, layout, residual, seed,
                                    device)
    return (x, weight, *bn_params(o, dtype, seed + 1, device), res)


def stats(o, device, dtype=torch.float64):
    return torch.zeros(o, dtype=dtype, device=device), torch.ones(o, dtype=dtype, device=device)


@training_backends
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", TRAIN_GEOMETRY, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_training_conv_matches_batchnorm_chain_fp64(backend, shape, geometry, layout):
    """Forward, every gradient (training_conv_bn_backward, then folded_conv_backward) and the running
    statistics against conv -> BatchNorm2d (train) -> add -> ReLU."""
    n, c, o, h, w = shape
    k, stride, padding, dilation = geometry
    dev = backend.device
    for residual, relu in EPILOGUES:
        x, weight, bn_weight, bn_bias, res = make_train_inputs(n, c, o, h, w, geometry, torch.float64, layout,
                                                               residual, device=dev)
        leaves = [t.requires_grad_() for t in (x, weight, bn_weight, bn_bias) + ((res,) if residual else ())]
        rm, rv = stats(o, dev)
        nbt = torch.zeros((), dtype=torch.long, device=dev)
        out = training_conv(x, weight, bn_weight, bn_bias, rm, rv, res, stride, padding, dilation, relu,
                            num_batches_tracked=nbt)
        bn = nn.BatchNorm2d(o).to(dev, torch.float64)
        with torch.no_grad():
            bn.weight.copy_(bn_weight), bn.bias.copy_(bn_bias)
        ref = bn(F.conv2d(x, weight, None, stride, padding, dilation))
        ref = ref + res if residual else ref
        ref = torch.relu(ref) if relu else ref
        assert nerr(out, ref) <= 1e-12 and out.dtype == torch.float64
        assert out.is_contiguous(memory_format=memory_format(layout == "channels_last"))
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, leaves, g)
        want = torch.autograd.grad(ref, [x, weight, bn.weight, bn.bias] + ([res] if residual else []), g)
        for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias", "residual"), got, want):
            assert nerr(a, b) <= 1e-11, (name, residual, relu, nerr(a, b))
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-12, atol=1e-15)
        assert int(nbt) == 1


@training_backends
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_training_conv_low_precision(backend, dtype):
    """The output and the batch statistics (accumulation dtype, judged at x's precision)."""
    geometry = (3, 1, 2, 2)
    x, weight, bn_weight, bn_bias, res = make_train_inputs(2, 24, 40, 13, 17, geometry, dtype, "channels_last", True,
                                                           device=backend.device)
    args = (x, weight, bn_weight, bn_bias, res, 1, 2, 2, True, 1e-5)
    got, want = ops.training_conv(*args), reference.training_conv(*args)
    assert got[0].dtype == dtype
    assert_low_precision_close(got[0], want[0], train_oracle(*args[:-1]), "training_conv")
    y64 = F.conv2d(x.double(), weight.double(), None, 1, 2, 2)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    assert_low_precision_close(got[2], want[2], mean64, "mean", dtype=dtype)     # fp32: no bf16 rounding
    assert_low_precision_close(got[3], want[3], var64, "var", dtype=dtype)
    rm, rv = stats(40, backend.device, torch.float32)
    out = training_conv(x, weight, bn_weight, bn_bias, rm, rv, res, 1, 2, 2, True)
    assert torch.equal(out, got[0])


@training_backends
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_training_conv_bn_backward_low_precision(backend, dtype):
    """``psp::training_conv_bn_backward`` on fp32/fp16/bf16 tensors against its float64 evaluation: grad of
    the conv output, of the residual (accumulation dtype math, rounded once) and of the BatchNorm parameters
    ([2, O], accumulation dtype, judged at x's precision)."""
    geometry = (3, 1, 2, 2)
    x, weight, bn_weight, bn_bias, res = make_train_inputs(2, 24, 40, 13, 17, geometry, dtype, "channels_last", True,
                                                           device=backend.device)
    out, y, mean, var = reference.training_conv(x, weight, bn_weight, bn_bias, res, 1, 2, 2, True, 1e-5)
    g = torch.randn(out.shape, dtype=torch.float64).to(backend.device, dtype).contiguous(
        memory_format=torch.channels_last)
    args = (g, y, out, bn_weight, bn_bias, mean, var, True, 1e-5, True)
    got, want = ops.training_conv_bn_backward(*args), reference.training_conv_bn_backward(*args)
    exact = reference.training_conv_bn_backward(*[t.double() for t in args[:7]], *args[7:])
    for name, a, b, e in zip(("grad_bn_input", "grad_residual", "grad_bn"), got, want, exact):
        assert a.dtype == b.dtype, name
        assert_low_precision_close(a, b, e, name, dtype=dtype)


@training_backends
def test_training_conv_deterministic_gradcheck_opcheck_and_errors(backend):
    dev = backend.device
    x, weight, bn_weight, bn_bias, res = make_train_inputs(2, 5, 4, 7, 6, (3, 1, 2, 2), torch.float64,
                                                           "channels_last", True, device=dev)
    a = training_conv(x, weight, bn_weight, bn_bias, *stats(4, dev), res, 1, 2, 2, True)
    assert torch.equal(a, training_conv(x, weight, bn_weight, bn_bias, *stats(4, dev), res, 1, 2, 2, True))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bn_weight, bn_bias, res)]
    assert torch.autograd.gradcheck(lambda *t: training_conv(*t[:4], *stats(4, dev), t[4], 1, 2, 2, True), leaves,
                                    fast_mode=True)
    torch.library.opcheck(ops.training_conv.default, (*leaves[:4], leaves[4], 1, 2, 2, True, 1e-5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        training_conv(x[:1, :, :1, :1], weight[:, :, :1, :1], bn_weight, bn_bias, *stats(4, dev))
    with pytest.raises(ValueError, match="bn_weight must have shape"):
        training_conv(x, weight, bn_weight[:3], bn_bias, *stats(4, dev))


@training_backends
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_conv_two_level_merges_fp64(backend, layout):
    """A map of 4608 pixels: Triton merges its 72 conv tiles' statistics (fp64 tiles of 64 pixels) and sums
    its 144 rows of BatchNorm backward sums (32 pixels a row) in two levels (chunks, then the chunks);
    forward, gradients and grad_bn against the chain, and the same bits twice."""
    dev = backend.device
    x, weight, bn_weight, bn_bias, res = make_train_inputs(2, 4, 70, 48, 48, (1, 1, 0, 1), torch.float64, layout,
                                                           True, device=dev)
    x = x + 3.0                                              # a mean far from zero
    out, y, mean, var = ops.training_conv(x, weight, bn_weight, bn_bias, res, 1, 0, 1, True, 1e-5)
    y64 = F.conv2d(x, weight)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), unbiased=False)
    assert nerr(mean, mean64) <= 1e-12 and nerr(var, var64) <= 1e-12
    assert nerr(out, train_oracle(x, weight, bn_weight, bn_bias, res, 1, 0, 1, True)) <= 1e-12
    g = torch.randn_like(out)
    args = (g, y, out, bn_weight, bn_bias, mean, var, True, 1e-5, True)
    got = ops.training_conv_bn_backward(*args)
    for name, a, b in zip(("grad_bn_input", "grad_residual", "grad_bn"), got,
                          reference.training_conv_bn_backward(*args)):
        assert nerr(a, b) <= 1e-12, name
    assert_bitwise((out, y, mean, var), ops.training_conv(x, weight, bn_weight, bn_bias, res, 1, 0, 1, True, 1e-5),
                   "training_conv")
    assert_bitwise(got, ops.training_conv_bn_backward(*args), "training_conv_bn_backward")


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_two_level_merges(backend, dtype):
    """The Triton merges at 1500 tiles and 5000 rows (two tile blocks and two row blocks per chunk, a partial
    last tile, a partial channel block) against torch in fp64; the same bits twice."""
    from psp_kernels.triton import conv as tconv
    from psp_kernels.triton.common import merge_tiles, sum_rows
    g = torch.Generator().manual_seed(0)
    tiles, tile_pixels, o = 1500, 4, 70
    m = tiles * tile_pixels - 2
    y = torch.randn(m, o, generator=g, dtype=torch.float64) * 2 + 5
    valid = (torch.arange(tiles * tile_pixels) < m).view(tiles, tile_pixels, 1)
    padded = torch.cat([y, y.new_zeros(tiles * tile_pixels - m, o)]).view(tiles, tile_pixels, o)
    tile_mean = padded.sum(1) / valid.sum(1)
    tile_m2 = ((padded - tile_mean[:, None]) * valid).pow(2).sum(1)
    part = torch.stack([tile_mean, tile_m2]).to(backend.device, dtype)
    mean, var = merge_tiles(part, m, tile_pixels, tconv.EW_BLOCK_O, tconv.EW_WARPS)
    var64, mean64 = torch.var_mean(y, dim=0, unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert nerr(mean, mean64) <= tol and nerr(var, var64) <= tol
    assert_bitwise((mean, var), merge_tiles(part, m, tile_pixels, tconv.EW_BLOCK_O, tconv.EW_WARPS), "merge_tiles")
    rows = torch.randn(2, 5000, o, generator=g, dtype=torch.float64).to(backend.device, dtype)
    sums, again = (torch.empty(2, o, dtype=dtype, device=backend.device) for _ in range(2))
    sum_rows(rows, sums, tconv.EW_BLOCK_O, tconv.EW_WARPS)
    sum_rows(rows, again, tconv.EW_BLOCK_O, tconv.EW_WARPS)
    assert nerr(sums, rows.double().sum(1)) <= tol
    assert_bitwise((sums,), (again,), "sum_rows")


@pytest.mark.backends("reference", "triton", "cuda", devices=("cuda",))
def test_fused_conv_bn_trains_fused_on_cuda_like_the_modules(backend):
    """Training on a GPU runs psp::training_conv (cuda-cuda: the table's CUDA default, eager): output and
    running statistics against the fp32 modules (PyTorch's own) and the fp64 modules (the oracle)."""
    conv, bn = make_pair(24, 40, 3, 1, 2, 2, dtype=torch.float32, device="cuda")
    twin_conv, twin_bn = make_pair(24, 40, 3, 1, 2, 2, dtype=torch.float32, device="cuda")
    twin_conv.load_state_dict(conv.state_dict()), twin_bn.load_state_dict(bn.state_dict())
    conv64, bn64 = make_pair(24, 40, 3, 1, 2, 2, device="cuda")
    conv64.load_state_dict(conv.state_dict()), bn64.load_state_dict(bn.state_dict())
    x = torch.randn(4, 24, 30, 30, device="cuda").contiguous(memory_format=torch.channels_last)
    out = fused_conv_bn(x, conv, bn)
    assert_low_precision_close(out, torch.relu(twin_bn(twin_conv(x))), torch.relu(bn64(conv64(x.double()))), "out")
    for name in ("running_mean", "running_var"):
        assert_low_precision_close(getattr(bn, name), getattr(twin_bn, name), getattr(bn64, name), name)
    assert int(bn.num_batches_tracked) == 1
