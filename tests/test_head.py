"""Concat-free PSP head (``psp_kernels.PSPHead``) against semseg's concat head.

Oracle: semseg's head math run module by module (``PSPHead(fused=False)``: SemsegPPM's concat, then the
3x3 conv, BN, ReLU) with the same parameters. float64 must agree to 1e-10 relative, forward and every
gradient; low precision is judged against PyTorch's own error in that dtype (as tests/test_ops.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import psp_kernels
from psp_kernels import reference as ref_mod
from psp_kernels.geometry import interpolation_matrix, shifted_interpolation
from psp_kernels.head import HeadConv, PSPHead, branch_conv, concat_free_head
from psp_kernels.ops.head import head_bn_relu
from test_ops import make_x

# (N, C, H, W): odd map, map smaller than bin 6, nesting map, N=1 (eval only).
SHAPES = [(2, 8, 13, 17), (2, 8, 5, 4), (2, 4, 12, 18), (1, 8, 60, 60)]


@pytest.fixture(params=["reference", "cpp", "triton"])
def backend(request):
    with psp_kernels.use_backend(request.param):
        yield request.param


def make_heads(c, dtype=torch.float64, out=6):
    """(concat-free, concat) heads with the same random, non-trivial parameters and BN statistics."""
    ours = PSPHead(c, 2, out)
    with torch.no_grad():
        for bn in [f[2] for f in ours.ppm.features] + [ours.cls[1]]:
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    ref = PSPHead(c, 2, out, fused=False)
    ref.load_state_dict(ours.state_dict())
    return ours.to(dtype), ref.to(dtype)


def grads(m):
    """Parameter gradients by semseg's names: a HeadConv's two parts joined into ``cls.0.weight``."""
    out = {name: p.grad for name, p in m.named_parameters()}
    if "cls.0.weight_x" in out:
        out["cls.0.weight"] = torch.cat([out.pop("cls.0.weight_x"), out.pop("cls.0.weight_branches")], dim=1)
    return out


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


NORM_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def assert_normwise_close(ours, eager, oracle, dtype, what):
    """Normwise relative error vs the fp64 oracle at most 3x eager PyTorch's in the same dtype, plus a
    per-dtype tolerance. 3x, not 2x: the design rounds the conv output twice in fp16/bf16 (the x-half
    conv's output, then its sum with the branch term, as an epilogue on a stored Y_x would), where the
    concat conv rounds once."""
    err = lambda t: ((t.double() - oracle).norm() / oracle.norm().clamp_min(1e-300)).item()  # noqa: E731
    bound = 3 * err(eager) + NORM_TOL[dtype]
    assert err(ours) <= bound, f"{what}: normwise error {err(ours):.3g} > {bound:.3g} (eager {err(eager):.3g})"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_concat_head_fp64(backend, shape, layout, training):
    n, c, h, w = shape
    ours, ref = make_heads(c)
    ours.train(training), ref.train(training)
    x = make_x(n, c, h, w, layout=layout)
    if training and n == 1:     # BN after bin 1 has one value per channel: both raise PyTorch's error
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ref(x)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ours(x)
        return
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(xa), ref(xb)
    assert out.shape == expected.shape == (n, 6, h, w)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert rel(out, expected) <= 1e-10
    g = torch.randn_like(expected)
    out.backward(g), expected.backward(g)
    assert rel(xa.grad, xb.grad) <= 1e-10
    expected_grads = grads(ref)
    assert set(grads(ours)) == set(expected_grads)
    for name, gr in grads(ours).items():
        assert rel(gr, expected_grads[name]) <= 1e-10, name
    for (name, b), r in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision(backend, dtype, layout, training):
    ours, oracle = make_heads(8)
    with torch.no_grad():   # BN shifts of +2.5: few outputs near 0, so few ReLU-mask flips from rounding,
        for name, t in oracle.named_parameters():   # whose O(1) errors would swamp the comparison
            if name.endswith("2.bias") or name == "cls.1.bias":
                t.fill_(2.5)
    ours.load_state_dict(oracle.state_dict())
    eager = PSPHead(8, 2, 6, fused=False)
    eager.load_state_dict(oracle.state_dict())
    ours, eager = ours.to(dtype), eager.to(dtype)
    for m in (ours, eager, oracle):
        m.train(training)
    x64 = make_x(4, 8, 13, 17, layout=layout)       # N=4: bin 1's batch statistics over 4 values
    x, xe = x64.to(dtype).requires_grad_(), x64.to(dtype).requires_grad_()
    xo = x.detach().double().requires_grad_()
    out, out_e, out_o = ours(x), eager(xe), oracle(xo)
    assert out.dtype == dtype
    assert_normwise_close(out, out_e, out_o, dtype, "forward")
    g = torch.randn_like(out_o).to(dtype)
    out.backward(g), out_e.backward(g), out_o.backward(g.double())
    assert_normwise_close(x.grad, xe.grad, xo.grad, dtype, "grad x")
    # Parameter gradients jointly: the per-channel BN gradients of a tiny batch are individually
    # ill-conditioned in bf16 (eager's own errors there range over an order of magnitude with the seed).
    names = sorted(grads(oracle))
    joint = [torch.cat([grads(m)[k].double().flatten() for k in names]) for m in (ours, eager, oracle)]
    assert_normwise_close(*joint, dtype, "parameter gradients")


def test_triton_backend_matches():
    """The branches may come from the Triton kernels (interpreter here): same head output."""
    ours, ref = make_heads(4)
    ours.eval(), ref.eval()
    x = make_x(1, 4, 12, 12)
    with psp_kernels.use_backend("triton"):
        assert rel(ours(x), ref(x)) <= 1e-10


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_branch_conv_is_the_conv_of_the_upsampled_branches(dilation):
    """Any dilation (padding = dilation), non-square maps, maps smaller than a bin: the zero-padding border."""
    bins, r, o = (1, 2, 3, 6), 3, 5
    for size in ((13, 17), (4, 5), (9, 9)):
        branches = torch.randn(2, r, 50, dtype=torch.float64)
        weight = torch.randn(o, 4 * r, 3, 3, dtype=torch.float64)
        ups = [torch.nn.functional.interpolate(p, size, mode="bilinear", align_corners=True)
               for p in psp_kernels.split_bins(branches, bins)]
        expected = torch.nn.functional.conv2d(torch.cat(ups, 1), weight, padding=dilation, dilation=dilation)
        got = branch_conv(branches, weight, bins, size, dilation, dilation)
        assert rel(got, expected) <= 1e-12


def test_shifted_interpolation_pads_with_zeros():
    a = interpolation_matrix(7, 3, torch.float64)
    s = shifted_interpolation(7, 3, 3, 1, 1, torch.float64)
    assert torch.equal(s[1], a)
    assert torch.equal(s[0, 1:], a[:-1]) and not s[0, 0].any()      # tap -1: row 0 reads outside: zero
    assert torch.equal(s[2, :-1], a[1:]) and not s[2, -1].any()      # tap +1: the last row: zero


def test_loads_semseg_head_keys():
    """semseg's ``ppm.features.*`` and ``cls.0`` / ``cls.1`` tensors load unchanged (cls.4 is not ours)."""
    ours, ref = make_heads(8)
    semseg = {f"ppm.{k}": v for k, v in ref.ppm.state_dict().items()}
    semseg.update({f"cls.{k}": v for k, v in ref.cls.state_dict().items()})
    semseg.update({"cls.4.weight": torch.zeros(3, 6, 1, 1), "cls.4.bias": torch.zeros(3)})
    fresh = PSPHead(8, 2, 6).double()
    result = fresh.load_state_dict(semseg, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["cls.4.weight", "cls.4.bias"]
    assert fresh.cls[0].weight.shape == (6, 16, 3, 3)
    fresh.eval(), ref.eval()
    x = make_x(2, 8, 13, 17)
    assert rel(fresh(x), ref(x)) <= 1e-10


def test_head_conv_is_semsegs_conv():
    """HeadConv: nn.Conv2d's state_dict (key ``weight``) both ways, its initialisation, its forward; the
    x part contiguous and the branch part tap-major, so the fused head copies neither."""
    torch.manual_seed(3)
    conv = HeadConv(8, 4, 6).double()
    torch.manual_seed(3)
    plain = nn.Conv2d(12, 6, 3, padding=1, bias=False).double()
    assert torch.equal(conv.weight, plain.weight)                       # nn.Conv2d's init, same RNG draws
    assert list(conv.state_dict()) == ["weight"] and conv.state_dict()["weight"].shape == (6, 12, 3, 3)
    with torch.no_grad():
        plain.weight.normal_()
    conv.load_state_dict(plain.state_dict())
    assert torch.equal(conv.weight, plain.weight)
    back = nn.Conv2d(12, 6, 3, padding=1, bias=False).double()
    back.load_state_dict(conv.state_dict())
    assert torch.equal(back.weight, plain.weight)
    x = make_x(2, 12, 7, 9)
    assert rel(conv(x), plain(x)) <= 1e-14
    assert conv.weight_x.is_contiguous() and conv.weight_taps().is_contiguous()
    assert conv.weight_taps().shape == (3, 3, 6, 4)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        conv.load_state_dict({"weight": torch.zeros(6, 10, 3, 3)})
    with pytest.raises(ValueError, match="positive channel counts"):
        HeadConv(8, 0, 6)


def test_fused_and_concat_heads_share_checkpoints():
    """PSPHead(fused=True) holds a HeadConv, fused=False an nn.Conv2d: the same state_dict either way."""
    ours, ref = make_heads(8)
    assert isinstance(ours.cls[0], HeadConv) and type(ref.cls[0]) is nn.Conv2d
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = make_x(2, 8, 13, 17)
    assert rel(ours(x), ref(x)) <= 1e-10
    ours.fused = False                                                   # HeadConv also runs the concat head
    assert rel(ours(x), ref(x)) <= 1e-10
    # and concat_free_head also takes the plain nn.Conv2d (slicing its weight)
    assert rel(concat_free_head(x, ref.ppm, ref.cls[0], ref.cls[1]), ref(x)) <= 1e-10


def test_rejects_a_conv_the_identity_does_not_cover():
    ours, _ = make_heads(8)
    x = make_x(2, 8, 13, 17)
    strided = nn.Conv2d(16, 6, 3, stride=2, padding=1, bias=False).double()
    with pytest.raises(ValueError, match="concat_free_head needs the PSP head conv"):
        concat_free_head(x, ours.ppm, strided, ours.cls[1])
    wrong_in = nn.Conv2d(12, 6, 3, padding=1, bias=False).double()
    with pytest.raises(ValueError, match="8 \\+ len\\(bins\\) \\* R input channels"):
        concat_free_head(x, ours.ppm, wrong_in, ours.cls[1])


# --------------------------------------------------------------------------------------------------
# The fused epilogue op, psp::head_bn_relu: every backend against the reference functions
# --------------------------------------------------------------------------------------------------

# (N, O, H, W, K): odd map, N=1 with O over one channel block and W < a column block, W over two column
# blocks, N*H over one block of merged rows.
OP_SHAPES = [(2, 6, 13, 17, 36), (1, 40, 5, 4, 9), (2, 33, 3, 70, 36), (2, 5, 40, 3, 9)]
OP_TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def op_inputs(shape, dtype, layout):
    n, o, h, w, k = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y = make_x(n, o, h, w, dtype, layout)
    u, bw = torch.randn(n, o, h, k, dtype=acc), torch.randn(w, k, dtype=acc) / k ** 0.5
    bn = [torch.rand(o) + 0.5, torch.randn(o) * 0.5, torch.randn(o) * 0.2, torch.rand(o) + 0.5]
    return y, u, bw, bn


def kernels(name):
    if name == "triton":
        from psp_kernels import triton as tri
        return tri
    ext = psp_kernels.backends.resolve(torch.device("cpu"), "cpp")
    if not hasattr(ext, "head_forward"):
        pytest.fail("the compiled extension has no head_forward: rebuild it (pip install --no-build-isolation -e .)")
    return ext


def normwise(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_keep_z"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_head_op_matches_reference(name, dtype, layout, mode, shape):
    """Forward (out, z, statistics) and backward (grad_y, grad_u, grad_gamma/beta) of a backend's kernels
    against psp_kernels.reference; fp16/bf16 normwise within 2x the reference's own error vs fp64."""
    training, keep_z = mode == "train", mode != "eval"
    y, u, bw, bn = op_inputs(shape, dtype, layout)
    got = kernels(name).head_forward(y, u, bw, *bn, training, 1e-5, keep_z)
    exp = ref_mod.head_forward(y, u, bw, *bn, training, 1e-5, keep_z)
    assert got[0].stride() == exp[0].stride() and got[0].dtype == dtype
    assert got[1].shape == exp[1].shape and (got[1].numel() == 0 or got[1].stride() == exp[1].stride())
    g = make_x(*shape[:4], dtype, "nchw")             # the gradient in the other layout when y is NHWC
    if dtype in OP_TOL:
        for a, b in zip(got, exp):
            assert a.dtype == b.dtype and (b.numel() == 0 or rel(a, b) <= OP_TOL[dtype])
        if keep_z:
            back = kernels(name).head_backward(g, exp[1], bw, bn[0], bn[1], exp[2], exp[3], training, 1e-5)
            back_ref = ref_mod.head_backward(g, exp[1], bw, bn[0], bn[1], exp[2], exp[3], training, 1e-5)
            assert back[0].stride() == back_ref[0].stride()
            for a, b in zip(back, back_ref):
                assert a.dtype == b.dtype and rel(a, b) <= OP_TOL[dtype]
        return
    # The Triton interpreter rounds fp32 -> bf16 by truncation (up to 1 ulp, not 0.5): 3x there; compiled
    # Triton is held to 2x in tests/test_gpu_triton.py.
    factor = 3 if name == "triton" and dtype == torch.bfloat16 else 2
    oracle = ref_mod.head_forward(y.double(), u.double(), bw.double(), *[t.double() for t in bn], training,
                                  1e-5, keep_z)
    for a, b, o in list(zip(got, exp, oracle))[:2 if keep_z else 1]:
        assert normwise(a, o) <= factor * normwise(b, o) + 1e-3
    if keep_z:
        z, mean, var = exp[1], exp[2], exp[3]
        back = kernels(name).head_backward(g, z, bw, bn[0], bn[1], mean, var, training, 1e-5)
        back_ref = ref_mod.head_backward(g, z, bw, bn[0], bn[1], mean, var, training, 1e-5)
        back_o = ref_mod.head_backward(g.double(), z.double(), bw.double(), bn[0].double(), bn[1].double(),
                                       mean.double(), var.double(), training, 1e-5)
        for a, b, o in zip(back, back_ref, back_o):
            assert normwise(a, o) <= factor * normwise(b, o) + 1e-3


@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_head_op_bitwise_deterministic(name):
    y, u, bw, bn = op_inputs((2, 33, 7, 70, 36), torch.float32, "channels_last")
    k = kernels(name)
    runs = []
    for _ in range(2):
        out, z, mean, var = k.head_forward(y, u, bw, *bn, True, 1e-5, True)
        runs.append((out, z, mean, var, *k.head_backward(y, z, bw, bn[0], bn[1], mean, var, True, 1e-5)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_head_op_opcheck(backend):
    for layout in ("nchw", "channels_last"):
        y, u, bw, bn = op_inputs((2, 6, 5, 7, 9), torch.float64, layout)
        y.requires_grad_(), u.requires_grad_(), bn[0].requires_grad_(), bn[1].requires_grad_()
        for training in (True, False):
            torch.library.opcheck(torch.ops.psp.head_bn_relu.default, (y, u, bw, *bn, training, 1e-5, True))


def test_head_op_gradcheck(backend):
    y, u, bw, bn = op_inputs((2, 3, 4, 5, 9), torch.float64, "channels_last")
    gamma, beta = bn[0].double().requires_grad_(), bn[1].double().requires_grad_()
    for training in (True, False):
        fn = lambda y, u, gamma, beta: head_bn_relu(  # noqa: E731
            y, u, bw, gamma, beta, bn[2].double().clone(), bn[3].double().clone(), training=training)
        assert torch.autograd.gradcheck(fn, (y.requires_grad_(), u.requires_grad_(), gamma, beta), fast_mode=True)


def test_head_op_rejects_bad_arguments():
    y, u, bw, bn = op_inputs((2, 6, 5, 7, 9), torch.float32, "nchw")
    with pytest.raises(ValueError, match="u must be \\[2, 6, 5, K\\] of dtype torch.float32"):
        head_bn_relu(y, u.double(), bw, *bn)
    with pytest.raises(ValueError, match="bw must be \\[7, 9\\]"):
        head_bn_relu(y, u, bw[:, :4], *bn)
    with pytest.raises(ValueError, match="running_var must have shape \\(6,\\)"):
        head_bn_relu(y, u, bw, *bn[:3], torch.ones(5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        head_bn_relu(y[:1, :, :1, :1], u[:1, :, :1], bw[:1], *bn, training=True)


_COMPILE_SCRIPT = """
import torch
from psp_kernels import reference
from psp_kernels.ops.head import head_bn_relu
from test_head import op_inputs, rel
y, u, bw, bn = op_inputs((2, 6, 5, 7, 9), torch.float32, "channels_last")
errors = []
for training in (True, False):
    fn = torch.compile(lambda y, u, g, b: head_bn_relu(y, u, bw, g, b, bn[2].clone(), bn[3].clone(),
                                                       training=training), fullgraph=True)
    args = [t.clone().requires_grad_() for t in (y, u, bn[0], bn[1])]
    out = fn(*args)
    out.sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (y, u, bn[0], bn[1])]
    expected = head_bn_relu(*ref_args[:2], bw, *ref_args[2:], bn[2].clone(), bn[3].clone(), training=training)
    expected.sum().backward()
    errors += [rel(out, expected)] + [rel(a.grad, b.grad) for a, b in zip(args, ref_args)]
print("@@", max(errors))
"""


def test_torch_compile_fullgraph(tmp_path):
    """psp::head_bn_relu traces whole under torch.compile (fake kernel, autograd) and matches eager,
    forward and every gradient, train and eval. Run in a subprocess without the Triton interpreter, which
    slows Inductor's CPU compiles. (The whole PSPHead also compiles with fullgraph=True, checked by hand:
    a cold Inductor compile of it takes over ten minutes on a 2-core machine, too long for CI.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0 and "@@" in run.stdout, run.stderr[-4000:]
    assert float(run.stdout.split("@@")[1]) <= 1e-5
