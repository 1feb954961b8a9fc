"""``psp::multibin_avg_pool`` and its kernel ops (backward, ``_with_concat``, ``_backward_add``) on every backend.

Oracle: ``psp_kernels.reference`` in float64 on the same (upcast) inputs, itself pinned to
``F.adaptive_avg_pool2d``. float64 agrees to 1e-12 (normwise); fp32/fp16/bf16 follow the one low-precision
rule (tests/helpers.py), PyTorch's own error being the reference's in that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_bits_independent_of_thread_count, assert_bitwise, assert_matches_oracle, make_x,
                     memory_format, rand, requires_cuda)
from psp_kernels import multibin_avg_pool, reference
from psp_kernels.geometry import packed_size, split_bins

pytestmark = pytest.mark.eager_twin      # the backend fixture also runs the eager ATen twin

ops = torch.ops.psp
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, bins): overlapping windows; H, W < 6 (windows repeat rows); 12x12 with bins (1, 3, 5); nesting
# windows on a non-square map (12x18); the nested bins at 60x60 with N=1; 60x60 with bins (1, 3, 5). The
# Triton interpreter runs the first four (cases= marker, tests/conftest.py).
INTERPRETED = [(2, 5, 13, 17, (1, 2, 3, 6)), (1, 3, 5, 4, (1, 2, 3, 6)), (2, 4, 12, 12, (1, 3, 5)),
               (2, 5, 12, 18, (1, 2, 3, 6))]
CASES = INTERPRETED + [(1, 8, 60, 60, (1, 2, 3, 6)), (2, 8, 60, 60, (1, 3, 5))]
LAYOUTS = ["nchw", "channels_last", "strided"]


def case_id(case):
    return "x".join(map(str, case[:4])) + "-b" + "".join(map(str, case[4]))


per_backend_cases = pytest.mark.cases(CASES, interpreted=INTERPRETED, ids=case_id)



# --------------------------------------------------------------------------------------------------
# Each kernel op against the reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(backend, dtype, case, layout):
    n, c, h, w, bins = case
    x = make_x(n, c, h, w, dtype, layout, backend.device)
    got = multibin_avg_pool(x, bins)
    assert got.dtype == dtype and got.shape == (n, c, packed_size(bins)) and got.is_contiguous()
    assert_matches_oracle(got, reference.multibin_avg_pool(x, bins), reference.multibin_avg_pool, (x, bins),
                          "multibin_avg_pool")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(backend, dtype, case, channels_last):
    n, c, h, w, bins = case
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=3, device=backend.device)
    got = ops.multibin_avg_pool_backward(g, list(bins), h, w, channels_last)
    assert got.dtype == dtype and got.shape == (n, c, h, w)
    assert got.is_contiguous(memory_format=memory_format(channels_last))
    args = (g, bins, h, w, channels_last)
    assert_matches_oracle(got, reference.multibin_avg_pool_backward(*args), reference.multibin_avg_pool_backward,
                          args, "multibin_avg_pool_backward")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_with_concat(backend, dtype, case, layout):
    """The pooling that also copies x into a new concat buffer: pooled bitwise equal to the plain op, x's
    channels copied exactly, x's memory format."""
    n, c, h, w, bins = case
    x = make_x(n, c, h, w, dtype, layout, backend.device)
    total = c + 7
    pooled, concat = ops.multibin_avg_pool_with_concat(x, list(bins), total)
    assert torch.equal(pooled, ops.multibin_avg_pool(x, list(bins))), "pooled must not depend on the fused copy"
    assert concat.shape == (n, total, h, w) and concat.dtype == dtype
    assert concat.is_contiguous(memory_format=memory_format(layout == "channels_last"))
    assert torch.equal(concat[:, :c], x), "x's channels must be copied exactly"


@pytest.mark.parametrize("residual_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@per_backend_cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_add(backend, dtype, case, channels_last, residual_layout):
    """The pooling backward plus a pass-through gradient, summed in the accumulation dtype and rounded once;
    the residual is a channel slice of a wider gradient (a view with its parent's strides)."""
    n, c, h, w, bins = case
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=3, device=backend.device)
    residual = make_x(n, c + 6, h, w, dtype, residual_layout, backend.device)[:, 2:2 + c]
    got = ops.multibin_avg_pool_backward_add(g, list(bins), residual, channels_last)
    assert got.dtype == dtype and got.shape == (n, c, h, w)
    assert got.is_contiguous(memory_format=memory_format(channels_last))
    args = (g, bins, residual, channels_last)
    assert_matches_oracle(got, reference.multibin_avg_pool_backward_add(*args),
                          reference.multibin_avg_pool_backward_add, args, "multibin_avg_pool_backward_add")


@pytest.mark.parametrize("shape,bins", [((1, 3, 1, 7), (1, 2, 3, 6)), ((1, 3, 6, 1), (1, 2, 3, 6)),
                                        ((1, 2, 3, 3), (1, 3)), ((2, 3, 1, 1), (1, 2))],
                         ids=["1x7", "6x1", "3x3-identity", "1x1"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_single_row_column_and_pixel(backend, shape, bins, layout):
    """H == 1 / W == 1 (the stride of a size-1 dim is arbitrary; a 1x1 map is both NCHW and channels_last)."""
    x = make_x(*shape, torch.float64, layout, backend.device)
    assert_matches_oracle(multibin_avg_pool(x, bins), None, reference.multibin_avg_pool, (x, bins), str(shape))
    g = rand(shape[0], shape[1], packed_size(bins), device=backend.device)
    cl = layout == "channels_last"
    got = ops.multibin_avg_pool_backward(g, list(bins), *shape[2:], cl)
    assert_matches_oracle(got, None, reference.multibin_avg_pool_backward, (g, bins, *shape[2:], cl), str(shape))


def test_reference_is_adaptive_avg_pool():
    """The oracle's windows are nn.AdaptiveAvgPool2d's (here H, W < 6: windows repeat rows and columns)."""
    bins = (1, 2, 3, 6)
    for h, w in ((5, 4), (13, 17)):
        x = make_x(2, 3, h, w)
        for got, b in zip(split_bins(reference.multibin_avg_pool(x, bins), bins), bins):
            torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, b), rtol=1e-13, atol=1e-14)


def test_matches_adaptive_avg_pool(backend):
    bins = (1, 2, 3, 6)
    x = make_x(2, 3, 5, 4, device=backend.device)  # H, W < 6: windows repeat rows and columns
    for got, b in zip(split_bins(multibin_avg_pool(x, bins), bins), bins):
        torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, b), rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Autograd, opcheck, NaN
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 13, 17, (1, 2, 3, 6)), (1, 2, 5, 4, (1, 2, 3, 6)),
                                   (2, 3, 7, 6, (1, 3, 5))], ids=case_id)
def test_gradcheck(backend, shape, layout):
    n, c, h, w, bins = shape
    # Random-projection gradcheck on the larger map and on Triton (interpreted kernels are slow; their
    # gradients are also pinned to the reference backward at 1e-12 above).
    fast = h * w > 100 or backend.name == "triton"
    x = make_x(n, c, h, w, layout=layout, device=backend.device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: multibin_avg_pool(t, bins), (x,), fast_mode=fast)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend, layout):
    bins = [1, 2, 3, 6]
    x = make_x(2, 3, 7, 9, layout=layout, device=backend.device).requires_grad_()
    torch.library.opcheck(ops.multibin_avg_pool.default, (x, bins))
    g = rand(2, 3, 50, device=backend.device)
    torch.library.opcheck(ops.multibin_avg_pool_backward.default, (g, bins, 7, 9, layout == "channels_last"))
    # The concat's channels after x are uninitialised by contract (upsample_into writes them), so the
    # comparison of eager and traced outputs (test_aot_dispatch_dynamic) does not apply to this op.
    torch.library.opcheck(ops.multibin_avg_pool_with_concat.default, (x.detach(), bins, 5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    residual = make_x(2, 3, 7, 9, layout=layout, device=backend.device)
    torch.library.opcheck(ops.multibin_avg_pool_backward_add.default, (g, bins, residual, False))


def test_nan_stays_in_its_image(backend):
    """A NaN in image 1 reaches every cell the oracle makes NaN, and never image 0. The C++, CUDA and
    reference kernels give the oracle's NaN set exactly; the Triton general path sums windows with 0/1-mask
    products, so a NaN also reaches the other cells of its (n, c) row (psp_kernels/triton/pooling.py)."""
    x = make_x(2, 4, 13, 17, device=backend.device)
    x[1, 3, 4, 5] = float("nan")
    got, expected = multibin_avg_pool(x, (1, 2, 3, 6)).isnan(), reference.multibin_avg_pool(x, (1, 2, 3, 6)).isnan()
    assert expected[1].any() and not got[0].any() and got[expected].all()
    if backend.name != "triton":
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

def run_all(device, dtype, layout, small=False):
    """Every pooling kernel op once on one fixed problem large enough to be split over threads (``small``: a
    2 x 3 x 7 x 9 map, for the Triton interpreter)."""
    torch.manual_seed(13)
    bins = [1, 2, 3, 6]
    x = make_x(*((2, 3, 7, 9) if small else (2, 64, 37, 45)), dtype, layout, device)
    n, c, h, w = x.shape
    g = rand(n, c, packed_size(bins), dtype=dtype, seed=19, device=device)
    pooled, concat = ops.multibin_avg_pool_with_concat(x, bins, c + 8)
    x_nested = make_x(n, 3, 12, 6, dtype, layout, device)
    residual = make_x(n, c + 3, h, w, dtype, layout, device)[:, :c]
    return [ops.multibin_avg_pool(x, bins), pooled, concat[:, :c], ops.multibin_avg_pool(x_nested, bins),
            ops.multibin_avg_pool_backward(g, bins, h, w, layout == "channels_last"),
            ops.multibin_avg_pool_backward_add(g, bins, residual, layout == "channels_last")]



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


@pytest.mark.backends("cpp", "cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_layouts_give_identical_bits(backend, dtype):
    """The C++ and CUDA kernels use one per-lane summation order for NCHW and channels_last."""
    bins = [1, 2, 3, 6]
    x = make_x(2, 70, 13, 17, dtype, device=backend.device)
    assert torch.equal(multibin_avg_pool(x, bins), multibin_avg_pool(x.contiguous(memory_format=torch.channels_last),
                                                                      bins))
    g = rand(2, 70, packed_size(bins), dtype=dtype, seed=4, device=backend.device)
    assert torch.equal(ops.multibin_avg_pool_backward(g, bins, 13, 17, False),
                       ops.multibin_avg_pool_backward(g, bins, 13, 17, True))


@pytest.mark.backends("cuda", devices=("cuda",))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_bits_equal_the_cpp_kernels(backend, dtype, layout):
    """The CUDA pooling sums in csrc/cpu/pooling.cpp's order (adds and one division, no FMA)."""
    bins, cl = [1, 2, 3, 6], layout == "channels_last"
    x = make_x(2, 70, 13, 17, dtype, layout)
    g = rand(2, 70, packed_size(bins), dtype=dtype, seed=4)
    got = [ops.multibin_avg_pool(x.cuda(), bins).cpu(),
           ops.multibin_avg_pool_backward(g.cuda(), bins, 13, 17, cl).cpu()]
    native = torch.ops.psp_native
    assert_bitwise(got, [native.multibin_avg_pool(x, bins), native.multibin_avg_pool_backward(g, bins, 13, 17, cl)],
                   "CUDA vs C++")


# --------------------------------------------------------------------------------------------------
# The Triton launchers' block configs and nested path
# --------------------------------------------------------------------------------------------------

@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bins,height,width", [((1, 2, 3, 6), 5, 70), ((1, 2), 3, 150), ((1, 2), 40, 13),
                                               ((1, 3, 5, 8), 8, 20), ((2, 7), 3, 4)],
                         ids=["w70", "w150", "rows40", "s128", "repeats"])
def test_triton_general_path(backend, bins, height, width, dtype):
    """The general path, forced: several W chunks (70 columns in channels_last, 150 in NCHW), partial tiles in
    every blocked dim (20 channels), row segments longer than a 16-row tile (bins 1/2 on 40 rows: two 20-row
    segments), 128-cell / 32-column tables (bins 1/3/5/8: S = 99, J = 17), windows repeating rows and columns
    (bin 7 on a 3x4 map: up to 3 cells of a column hold one row), and NaN locality in both directions."""
    from psp_kernels.triton import pooling as tpool
    s = packed_size(bins)
    for cl in (False, True):
        x = make_x(1, 20, height, width, dtype, "channels_last" if cl else "nchw", backend.device)
        assert_matches_oracle(tpool.multibin_avg_pool(x, bins, config="general"), reference.multibin_avg_pool(x, bins),
                              reference.multibin_avg_pool, (x, bins), "forward")
        g = rand(1, 20, s, dtype=dtype, device=backend.device)
        args = (g, bins, height, width, cl)
        assert_matches_oracle(tpool.multibin_avg_pool_backward(*args, config="general"),
                              reference.multibin_avg_pool_backward(*args), reference.multibin_avg_pool_backward, args,
                              "backward")
        x[0, 3, height // 2, width // 3] = float("nan")
        assert torch.equal(tpool.multibin_avg_pool(x, bins, config="general").isnan(),
                           reference.multibin_avg_pool(x.double(), bins).isnan())
        g[0, 3, s - 1] = float("nan")
        cell = torch.zeros(1, 20, s, dtype=torch.float64, device=backend.device)
        cell[0, 3, s - 1] = 1.0
        assert torch.equal(tpool.multibin_avg_pool_backward(*args, config="general").isnan(),
                           reference.multibin_avg_pool_backward(cell, bins, height, width, cl) != 0)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height,width", [(6, 18), (6, 126), (6, 300), (102, 18)],
                         ids=["w18", "w126", "w300", "rows17"])
def test_triton_nested_tiles(backend, height, width, dtype):
    """The nested path's tiles: W in one chunk or several (NCHW chunks are 64 or 128 wide, channels_last ones
    16 or 32), one image row per fine row (16-row tiles mostly masked) or 17 (two row steps per fine row),
    21 channels (a partial channel block in every tile config), NaN locality."""
    from psp_kernels.triton import pooling as tpool
    bins, c = (1, 2, 3, 6), 21
    assert tpool.nested_level(bins, height, width) == 6
    for cl in (False, True):
        x = make_x(1, c, height, width, dtype, "channels_last" if cl else "nchw", backend.device)
        assert_matches_oracle(multibin_avg_pool(x, bins), reference.multibin_avg_pool(x, bins),
                              reference.multibin_avg_pool, (x, bins), "forward")
        g = rand(1, c, 50, dtype=dtype, device=backend.device)
        args = (g, bins, height, width, cl)
        assert_matches_oracle(ops.multibin_avg_pool_backward(*args), reference.multibin_avg_pool_backward(*args),
                              reference.multibin_avg_pool_backward, args, "backward")
        x[0, 3, 2, 5] = float("nan")        # the nested path keeps a NaN in the cells containing it
        assert torch.equal(multibin_avg_pool(x, bins).isnan(), reference.multibin_avg_pool(x.double(), bins).isnan())
        g[0, 3, 7] = float("nan")            # ... and a NaN gradient in the pixels of its cell
        cell = torch.zeros(1, c, 50, dtype=torch.float64, device=backend.device)
        cell[0, 3, 7] = 1.0
        assert torch.equal(ops.multibin_avg_pool_backward(*args).isnan(),
                           reference.multibin_avg_pool_backward(cell, bins, height, width, cl) != 0)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

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
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.backends("cpp", "cuda")
def test_compiled_kernels_raise_on_bad_internal_arguments(backend):
    """The compiled kernels check what reaches them (never crash): empty or invalid bins, ranks, sizes."""
    native = torch.ops.psp_native
    x = rand(1, 2, 5, 5, device=backend.device)
    with pytest.raises(RuntimeError, match="bins must not be empty"):
        native.multibin_avg_pool(x, [])
    with pytest.raises(RuntimeError, match=">= 1"):
        native.multibin_avg_pool(x, [0, 2])
    with pytest.raises(RuntimeError, match="4-D"):
        native.multibin_avg_pool(x[0], [1, 2])
    with pytest.raises(RuntimeError, match="S = sum"):
        native.multibin_avg_pool_backward(rand(1, 2, 6, device=backend.device), [1, 2], 5, 5, False)
    with pytest.raises(RuntimeError, match="residual"):
        native.multibin_avg_pool_backward_add(rand(1, 2, 5, device=backend.device), [1, 2],
                                              rand(1, 3, 5, 5, device=backend.device), False)
    if backend.device == "cuda":
        with pytest.raises(RuntimeError, match="at most 8 bins"):
            native.multibin_avg_pool(x, list(range(1, 10)))


@requires_cuda
def test_runs_on_the_tensors_device():
    """The kernel table enters x's device: a tensor on another GPU than the current one runs there."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    x = make_x(2, 3, 13, 17, torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        got = multibin_avg_pool(x)
    assert got.device == x.device
    torch.testing.assert_close(got.cpu(), reference.multibin_avg_pool(x.cpu(), (1, 2, 3, 6)))
