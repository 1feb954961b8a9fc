"""Helpers shared by the tests: seeded inputs, semseg's PPM with random statistics, and the one
low-precision rule (:func:`assert_low_precision_close`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

#: for tests of GPU-only behaviour (launch counts, CUDA graphs, devices)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rand(*shape, dtype=torch.float64, seed=0, device="cpu") -> torch.Tensor:
    """Standard normal values in ``dtype`` (drawn in float64 from their own generator, so every dtype sees
    the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def make_x(n, c, h, w, dtype=torch.float64, layout="nchw", device="cpu") -> torch.Tensor:
    """x [N, C, H, W] in a layout the kernels see: ``nchw``, ``channels_last`` or ``strided`` (every other
    channel of a wider tensor: neither NCHW- nor NHWC-contiguous)."""
    if layout == "strided":    # sliced after the conversion: .to() of a non-dense tensor makes it contiguous
        return torch.randn(n, 2 * c, h, w, dtype=torch.float64).to(device=device, dtype=dtype)[:, ::2]
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def randomize_batchnorms(module: torch.nn.Module) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm of ``module``."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)


def make_ppm(c, bins, dtype=torch.float64, fused=True, device="cpu"):
    """A ``PyramidPooling`` and semseg's PPM (``reference.SemsegPPM``) with the same random parameters and
    BatchNorm statistics."""
    import psp_kernels
    from psp_kernels.reference import SemsegPPM
    r = max(c // len(bins), 2)
    semseg = SemsegPPM(c, r, bins)
    randomize_batchnorms(semseg)
    ours = psp_kernels.PyramidPooling(c, r, bins, fused=fused)
    ours.load_state_dict(semseg.state_dict())
    return ours.to(device, dtype), semseg.to(device, dtype)


# --------------------------------------------------------------------------------------------------
# The low-precision rule
# --------------------------------------------------------------------------------------------------

#: atol of the low-precision rule, relative to max(1, max |oracle|): about two ulps in fp16 / bf16.
ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(t: torch.Tensor, oracle: torch.Tensor) -> float:
    return (t.double() - oracle.double()).abs().max().item() if t.numel() else 0.0


def assert_low_precision_close(ours: torch.Tensor, pytorch: torch.Tensor, oracle: torch.Tensor, what: str = "",
                               *, dtype: torch.dtype | None = None, factor: float = 2.0, reason: str = "") -> None:
    """The one rule for results in fp32 / fp16 / bf16: our error against the fp64 oracle is at most
    ``factor`` (2) times PyTorch's own error in the same dtype, plus a small atol:

        max |ours - oracle| <= factor * max |pytorch - oracle| + ATOL[dtype] * max(1, max |oracle|)

    ``pytorch`` is what PyTorch computes in that dtype from the same inputs (semseg's modules, or the
    reference ops); ``dtype`` is the precision judged (default ``ours.dtype``; give the input's dtype for
    results kept in the accumulation dtype). Any other ``factor`` must come with its ``reason``.
    """
    if factor != 2.0 and not reason:
        raise ValueError("a factor other than 2 needs its reason")
    dtype = dtype or ours.dtype
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    err, eager_err = max_error(ours, oracle), max_error(pytorch, oracle)
    scale = max(1.0, oracle.double().abs().max().item()) if oracle.numel() else 1.0
    bound = factor * eager_err + ATOL[dtype] * scale
    assert err <= bound, (f"{what}: max error {err:.3g} > {bound:.3g} = {factor} x PyTorch's {dtype} error "
                          f"{eager_err:.3g} + atol{(' (' + reason + ')') if reason else ''}")


def assert_bitwise(first, second, what: str) -> None:
    """Each tensor of the sequence ``first`` equals its partner in ``second`` in dtype and every bit."""
    assert len(first) == len(second), f"{what}: {len(first)} vs {len(second)} results"
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: result {i} differs"


def assert_bits_independent_of_thread_count(set_threads, run) -> None:
    """``run()`` (a list of tensors) gives the same bits with 2 threads and with 1; ``set_threads`` is the
    conftest ``threads`` fixture."""
    set_threads(2)
    first = run()
    set_threads(1)
    assert_bitwise(first, run(), "1 vs 2 threads")


def assert_module_low_precision_close(ours, eager, oracle, x64: torch.Tensor, dtype: torch.dtype) -> None:
    """Runs the modules ``ours`` and ``eager`` (in ``dtype``) and the fp64 ``oracle`` forward and backward on
    ``x64`` rounded to ``dtype`` (the oracle gets the same rounded input), with one random output gradient,
    and checks the output and the gradient of x by :func:`assert_low_precision_close`. The parameter
    gradients are left in ``.grad`` for the caller to compare."""
    x, x_eager = x64.to(dtype).requires_grad_(), x64.to(dtype).requires_grad_()
    x_oracle = x.detach().double().requires_grad_()
    out, out_eager, out_oracle = ours(x), eager(x_eager), oracle(x_oracle)
    assert out.dtype == dtype
    assert_low_precision_close(out, out_eager, out_oracle, "forward")
    g = torch.randn_like(out_oracle).to(dtype)
    out.backward(g), out_eager.backward(g), out_oracle.backward(g.double())
    assert_low_precision_close(x.grad, x_eager.grad, x_oracle.grad, "grad x")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def assert_close_to_oracle(got: torch.Tensor, low, oracle: torch.Tensor, what: str) -> None:
    """float64: max-abs error within 1e-12 of the oracle's largest magnitude; otherwise the low-precision rule
    (:func:`assert_low_precision_close`) with ``low`` as PyTorch's own result in ``got``'s dtype."""
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    if got.dtype == torch.float64:
        scale = max(oracle.abs().max().item(), 1e-30)
        err = (got - oracle).abs().max().item()
        assert err <= 1e-12 * scale, f"{what}: max error {err:.3g} > 1e-12 x {scale:.3g}"
    else:
        assert_low_precision_close(got, low, oracle, what)


def assert_matches_oracle(got: torch.Tensor, low, oracle_fn, inputs, what: str) -> None:
    """``got`` (computed from ``inputs`` in their dtype) against ``oracle_fn`` on the inputs cast to float64,
    by :func:`assert_close_to_oracle`."""
    oracle = oracle_fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in inputs])
    assert_close_to_oracle(got, low, oracle, what)


@contextlib.contextmanager
def cudnn_tf32(allowed: bool):
    """``torch.backends.cudnn.allow_tf32 = allowed`` within the block (every other cuDNN flag untouched)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved
