"""``psp::upsample_concat`` (x and every branch upsampled bilinearly, align_corners=True, in one concat), its
backward and ``upsample_into`` (the whole-PPM op's pass writing only the branch channels) on every backend.

Oracle: ``psp_kernels.reference`` in float64 on the same (upcast) inputs (``F.interpolate`` per bin, and the
transposed interpolation for the backward). float64 agrees to 1e-12 (normwise); fp32/fp16/bf16 follow the
one low-precision rule (tests/helpers.py), PyTorch's own result being the reference at the inputs' dtype. x's
channels are copied exactly, and ``upsample_into`` writes the same bits as ``upsample_concat``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (assert_bits_independent_of_thread_count, assert_bitwise, assert_low_precision_close,
                     assert_matches_oracle, make_x, memory_format, rand)
from psp_kernels import reference, upsample_concat
from psp_kernels.geometry import packed_size

pytestmark = pytest.mark.eager_twin      # the backend fixture also runs the eager ATen twin

ops = torch.ops.psp
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
B = (1, 2, 3, 6)
# (N, C, H, W, bins, R): overlapping taps on odd sizes; H, W < 6 (maps smaller than the largest bin); bins
# (1, 3, 5); a non-square map (12x18); the 60x60 maps at N = 1 and with bins (1, 3, 5). The Triton interpreter
# runs the first four (R = 4, the old Triton tests' shapes); the others are the C++ and CUDA tests' (R = 3).
INTERPRETED = [(2, 5, 13, 17, B, 4), (1, 3, 5, 4, B, 4), (2, 4, 12, 12, (1, 3, 5), 4), (2, 5, 12, 18, B, 4)]
CASES = INTERPRETED + [(2, 5, 13, 17, B, 3), (1, 3, 5, 4, B, 3), (2, 4, 12, 12, (1, 3, 5), 3),
                       (1, 8, 60, 60, B, 3), (2, 8, 60, 60, (1, 3, 5), 3)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def case_id(case):
    return "x".join(map(str, case[:4])) + "-b" + "".join(map(str, case[4])) + f"-r{case[5]}"


per_backend_cases = pytest.mark.cases(CASES, interpreted=INTERPRETED, ids=case_id)



def check_forward(got, x, branches, bins, what="upsample_concat"):
    n, c, h, w = x.shape
    assert got.dtype == x.dtype and got.shape == (n, c + len(bins) * branches.shape[1], h, w)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert got.is_contiguous(memory_format=memory_format(cl)), "x's memory format (NCHW for a strided x)"
    assert torch.equal(got[:, :c], x), "x's channels must be copied exactly"
    assert_matches_oracle(got, reference.upsample_concat(x, branches, bins), reference.upsample_concat,
                          (x, branches, bins), what)


def check_backward(got, grad_out, bins, channels, what="upsample_concat_backward", serial_fp32=False):
    """``serial_fp32``: ``got`` is ATen's own ``upsample_bilinear2d_backward`` (the eager twin), which sums each
    cell's gradient serially in fp32 over the whole map where the reference sums ``A_hᵀ g A_w`` by blocked
    matmuls: about 5x the reference's fp32 error at 60x60, hence factor 8 for it."""
    n, total = grad_out.shape[:2]
    assert got.dtype == grad_out.dtype and got.is_contiguous()
    assert got.shape == (n, (total - channels) // len(bins), packed_size(bins))
    args = (grad_out, bins, channels)
    low = reference.upsample_concat_backward(*args)
    if serial_fp32 and got.dtype == torch.float32:
        oracle = reference.upsample_concat_backward(grad_out.double(), bins, channels)
        assert_low_precision_close(got, low, oracle, what, factor=8.0,
                                   reason="ATen's upsample backward sums serially in fp32")
        return
    assert_matches_oracle(got, low, reference.upsample_concat_backward, args, what)


# --------------------------------------------------------------------------------------------------
# Each kernel op against the reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(backend, dtype, case, layout):
    n, c, h, w, bins, r = case
    x = make_x(n, c, h, w, dtype, layout, backend.device)
    branches = rand(n, r, packed_size(bins), dtype=dtype, seed=9, device=backend.device)
    check_forward(upsample_concat(x, branches, bins), x, branches, bins)


@pytest.mark.parametrize("layout", LAYOUTS)
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(backend, dtype, case, layout):
    """The kernels read grad_out in place: NCHW, channels_last or a channel-strided view."""
    n, c, h, w, bins, r = case
    grad_out = make_x(n, c + r * len(bins), h, w, dtype, layout, backend.device)
    check_backward(ops.upsample_concat_backward(grad_out, list(bins), c), grad_out, bins, c,
                   serial_fp32=backend.name == "eager")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_into(backend, dtype, case, layout):
    """upsample_into, in the whole-PPM op's forward (after the pooling pass that allocated the concat and
    copied x into it), writes exactly the branch channels of upsample_concat (same bits) and nothing else."""
    n, c, h, w, bins, r = case
    x = make_x(n, c, h, w, dtype, layout, backend.device)
    branches = rand(n, r, packed_size(bins), dtype=dtype, seed=9, device=backend.device)
    expected = upsample_concat(x, branches, bins)
    _, concat = ops.multibin_avg_pool_with_concat(x, list(bins), c + r * len(bins))
    concat[:, c:] = float("nan")
    assert ops.upsample_into(concat, branches, list(bins), c) is None
    assert concat.is_contiguous(memory_format=memory_format(layout == "channels_last"))
    assert_matches_oracle(concat[:, c:], expected[:, c:], lambda *a: reference.upsample_concat(*a)[:, c:],
                          (x, branches, bins), "upsample_into")
    assert torch.equal(concat, expected), "upsample_into must write the bits of upsample_concat, and only them"


@pytest.mark.parametrize("shape,bins,r", [((1, 3, 1, 7), B, 4), ((1, 3, 6, 1), B, 4), ((1, 2, 3, 3), (1, 3), 2),
                                          ((2, 3, 1, 1), (1, 2), 2)],
                         ids=["1x7", "6x1", "3x3-identity", "1x1"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_single_row_column_pixel_and_identity(backend, shape, bins, r, layout, dtype):
    """H == 1 / W == 1 (scale 0 along that axis; the stride of a size-1 dim is arbitrary; a 1x1 map is both
    NCHW and channels_last) and b == H == W (identity taps)."""
    n, c, h, w = shape
    x = make_x(*shape, dtype, layout, backend.device)
    branches = rand(n, r, packed_size(bins), dtype=dtype, seed=2, device=backend.device)
    got = upsample_concat(x, branches, bins)
    assert torch.equal(got[:, :c], x)
    assert_matches_oracle(got, reference.upsample_concat(x, branches, bins), reference.upsample_concat,
                          (x, branches, bins), f"forward {shape}")
    grad_out = make_x(n, c + r * len(bins), h, w, dtype, layout, backend.device)
    check_backward(ops.upsample_concat_backward(grad_out, list(bins), c), grad_out, bins, c, f"backward {shape}")


# --------------------------------------------------------------------------------------------------
# The Triton launchers' block configs
# --------------------------------------------------------------------------------------------------

def triton_configs(which: str) -> list[str]:
    from psp_kernels.triton import upsample as tup
    return list(tup.UPSAMPLE_FWD_CONFIGS if which == "fwd" else tup.UPSAMPLE_BWD_CONFIGS)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("config", triton_configs("fwd"))
def test_triton_fwd_configs(backend, config):
    """Every forward config on both layouts: 66 channels and 33 pixels (partial channel and pixel tiles)."""
    from psp_kernels.triton import upsample as tup
    for layout in ("nchw", "channels_last"):
        x = make_x(1, 66, 3, 11, torch.float32, layout, backend.device)
        branches = rand(1, 66, 50, dtype=torch.float32, device=backend.device)
        check_forward(tup.upsample_concat(x, branches, B, config=config), x, branches, B, config)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("config", triton_configs("bwd"))
def test_triton_bwd_configs(backend, config):
    """Every backward config on both layouts: R = 66 > 64, W = 130 > 128 (partial channel and column tiles)."""
    from psp_kernels.triton import upsample as tup
    for layout in ("nchw", "channels_last"):
        grad_out = make_x(1, 3 + 4 * 66, 2, 130, torch.float32, layout, backend.device)
        check_backward(tup.upsample_concat_backward(grad_out, B, 3, config=config), grad_out, B, 3, config)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_backward_nan_stays_in_its_taps(backend, layout):
    """The Triton backward spreads rows and cuts columns by selection (no tap-matrix product): a NaN gradient
    pixel reaches exactly the cells (i0 | i1, j0 | j1) of its channel whose taps read it."""
    c, r, h, w = 3, 2, 13, 17
    grad_out = make_x(1, c + r * len(B), h, w, torch.float32, layout, backend.device)
    k, ch, y, x = 3, 1, 7, 11                       # bin 6, its channel 1, pixel (7, 11)
    grad_out[0, c + k * r + ch, y, x] = float("nan")
    got = ops.upsample_concat_backward(grad_out, list(B), c).isnan()

    def taps(o, size, b):
        src = torch.tensor(o, dtype=torch.float32) * (torch.tensor(b - 1, dtype=torch.float32) / (size - 1))
        i0 = min(int(src), b - 1)
        return {i0, min(i0 + 1, b - 1)}
    b, off = B[k], sum(v * v for v in B[:k])
    expected = torch.zeros_like(got)
    for i in taps(y, h, b):
        for j in taps(x, w, b):
            expected[0, ch, off + i * b + j] = True
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------
# Autograd, opcheck
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 13, 17, B), (1, 2, 5, 4, B), (2, 3, 7, 6, (1, 3, 5))],
                         ids=lambda s: "x".join(map(str, s[:4])) + "-b" + "".join(map(str, s[4])))
def test_gradcheck(backend, shape, layout):
    n, c, h, w, bins = shape
    # Random-projection gradcheck on the larger map and on Triton (interpreted kernels are slow; their
    # gradients are also pinned to the reference backward at 1e-12 above).
    fast = h * w > 100 or backend.name == "triton"
    x = make_x(n, c, h, w, layout=layout, device=backend.device).requires_grad_()
    branches = torch.randn(n, 2, packed_size(bins), dtype=torch.float64, device=backend.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, b: upsample_concat(t, b, bins), (x, branches), fast_mode=fast)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend, layout):
    bins, dev = [1, 2, 3, 6], backend.device
    x = make_x(2, 3, 7, 9, layout=layout, device=dev).requires_grad_()
    branches = torch.randn(2, 2, 50, dtype=torch.float64, device=dev, requires_grad=True)
    torch.library.opcheck(ops.upsample_concat.default, (x, branches, bins))
    grad_out = make_x(2, 3 + 4 * 2, 7, 9, layout=layout, device=dev)
    torch.library.opcheck(ops.upsample_concat_backward.default, (grad_out, bins, 3))
    concat = make_x(2, 3 + 4 * 2, 7, 9, layout=layout, device=dev)
    torch.library.opcheck(ops.upsample_into.default, (concat, branches.detach(), bins, 3))


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

def run_all(device, dtype, layout, small=False):
    """Every upsampling kernel op once on one fixed problem large enough to be split over threads (``small``:
    a 2 x 3 x 7 x 9 map with R = 4, for the Triton interpreter)."""
    torch.manual_seed(13)
    n, c, h, w, r = (2, 3, 7, 9, 4) if small else (2, 64, 37, 45, 384)
    x = make_x(n, c, h, w, dtype, layout, device)
    branches = rand(n, r, packed_size(B), dtype=dtype, seed=17, device=device)
    concat = torch.zeros(n, c + 4 * r, h, w, dtype=dtype, device=device).contiguous(
        memory_format=memory_format(layout == "channels_last"))
    ops.upsample_into(concat, branches, list(B), c)
    grad_out = make_x(n, c + 4 * r, h, w, dtype, layout, device)
    return [ops.upsample_concat(x, branches, list(B)), concat, ops.upsample_concat_backward(grad_out, list(B), c)]



@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(backend, dtype, layout):
    small = backend.name == "triton" and backend.device == "cpu"
    assert_bitwise(run_all(backend.device, dtype, layout, small), run_all(backend.device, dtype, layout, small),
                   "two runs")


@pytest.mark.backends("cpp", devices=("cpu",))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_bits_independent_of_thread_count(backend, threads, dtype, layout):
    assert_bits_independent_of_thread_count(threads, lambda: run_all("cpu", dtype, layout))


@pytest.mark.backends("cpp", devices=("cpu",))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_layouts_give_identical_bits(backend, dtype):
    """The C++ kernels use one per-lane summation order for NCHW and channels_last."""
    x = make_x(2, 70, 13, 17, dtype)
    branches = rand(2, 67, packed_size(B), dtype=dtype, seed=6)
    assert torch.equal(upsample_concat(x, branches, B),
                       upsample_concat(x.contiguous(memory_format=torch.channels_last), branches, B))
    grad_out = rand(2, 70 + 4 * 67, 13, 17, dtype=dtype, seed=8)
    assert torch.equal(ops.upsample_concat_backward(grad_out, list(B), 70),
                       ops.upsample_concat_backward(grad_out.contiguous(memory_format=torch.channels_last), list(B),
                                                    70))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 49)), ValueError, "branches must have shape"),
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 50, dtype=torch.float64)), TypeError,
     "branches must have x's dtype"),
    (lambda: upsample_concat(torch.randn(2, 3, 5, 5), torch.randn(2, 2, 50, device="meta")), RuntimeError,
     "branches is on meta"),
], ids=["branches-shape", "branches-dtype", "branches-device"])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.backends("cpp", "cuda")
def test_compiled_kernels_raise_on_bad_internal_arguments(backend):
    """The compiled kernels check what reaches them (never crash): batch and channel counts."""
    native, dev = torch.ops.psp_native, backend.device
    bins = [1, 2]
    s = packed_size(bins)
    with pytest.raises(RuntimeError, match="batch"):
        native.upsample_concat(rand(1, 2, 5, 5, device=dev), rand(2, 3, s, device=dev), bins)
    with pytest.raises(RuntimeError, match=r"len\(bins\)"):
        native.upsample_concat_backward(rand(1, 2 + 5, 5, 5, device=dev), bins, 2)
    with pytest.raises(RuntimeError, match=r"len\(bins\)"):
        native.upsample_into(rand(1, 2 + 5, 5, 5, device=dev), rand(1, 3, s, device=dev), bins, 2)
