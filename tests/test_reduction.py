"""``psp::reduction_conv_bn_relu`` (every bin's 1x1 reduction conv + BatchNorm + ReLU on the packed pooled
tensor) and its backward kernel op on every backend, through the op and through the public function.

Oracle: ``psp_kernels.reference`` in float64 on the same (upcast) inputs and parameters; the backward's oracle
starts from the kernel's own bn_input / mean / var (so the ReLU masks agree). float64 agrees to 1e-12
(normwise); fp32/fp16/bf16 follow the one low-precision rule (tests/helpers.py), PyTorch's own result being
the reference run on the low-precision inputs. Results kept in the accumulation dtype (bn_input, mean, var,
the parameter gradients) are judged at that dtype's atol.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_bits_independent_of_thread_count, assert_bitwise, assert_close_to_oracle, rand
from psp_kernels import reduction_conv_bn_relu, reference
from psp_kernels.geometry import acc_dtype, packed_size

ops = torch.ops.psp
EPS = 1e-5
B = (1, 2, 3, 6)
# (N, C, R, bins). The Triton interpreter runs the first three (C = 8, R = 4: the old Triton tests'); the
# others are the C++ and CUDA tests' (R = 3): N = 1 (bin 1 has one value per channel in training: zero
# variance), C = 3, 4, 5, bins (1, 3, 5).
INTERPRETED = [(2, 8, 4, B), (1, 8, 4, B), (2, 8, 4, (1, 3, 5))]
CASES = INTERPRETED + [(2, 5, 3, B), (1, 3, 3, B), (1, 8, 3, B), (2, 4, 3, (1, 3, 5)), (2, 8, 3, (1, 3, 5))]
# (dtype of pooled, dtype of the conv / BatchNorm parameters): parameters are pooled's dtype or fp32 (AMP).
DTYPE_PAIRS = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float32),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
DTYPE_PAIR_IDS = [f"{str(a)[6:]}-{str(b)[6:]}params" for a, b in DTYPE_PAIRS]


def case_id(case):
    n, c, r, bins = case
    return f"n{n}c{c}r{r}-b" + "".join(map(str, bins))


per_backend_cases = pytest.mark.cases(CASES, interpreted=INTERPRETED, ids=case_id)
dtype_pairs = pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
modes = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def branch_params(c, r, bins, dtype, seed=1, device="cpu"):
    """Per bin: conv weights [R, C, 1, 1], bn_weights, bn_biases, running means and (positive) vars [R]."""
    nb = len(bins)

    def make(fn):
        return [fn(k).to(device=device, dtype=dtype) for k in range(nb)]
    return (make(lambda k: rand(r, c, 1, 1, seed=seed + k) / c ** 0.5),
            make(lambda k: 1 + 0.5 * rand(r, seed=seed + 10 + k)),
            make(lambda k: 0.2 * rand(r, seed=seed + 20 + k)),
            make(lambda k: 0.3 * rand(r, seed=seed + 30 + k)),
            make(lambda k: 0.5 + rand(r, seed=seed + 40 + k).abs()))


def f64(value):
    if isinstance(value, torch.Tensor):
        return value.double()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return [t.double() for t in value]
    return value



def check_forward(got, pooled, params, bins, training):
    """``got`` = (out, bn_input, mean, var) of the forward on ``pooled`` and ``params``, against the oracle."""
    n, c, s = pooled.shape
    nb, r = len(bins), params[0][0].shape[0]
    dtype, acc = pooled.dtype, acc_dtype(pooled.dtype)
    out, bn_input, mean, var = got
    assert out.dtype == dtype and (bn_input.dtype, mean.dtype, var.dtype) == (acc, acc, acc)
    assert out.shape == bn_input.shape == (n, r, s) and mean.shape == var.shape == (nb, r)
    assert out.is_contiguous() and bn_input.is_contiguous()
    args = (pooled, *params, list(bins), training, EPS)
    oracle = reference.reduction_conv_bn_relu(*map(f64, args))
    low = reference.reduction_conv_bn_relu(*args)
    for what, t, lo, o in zip(("out", "bn_input", "mean", "var"), got, low, oracle):
        assert_close_to_oracle(t, lo, o, what)


def check_backward(backward, pooled, bn_input, mean, var, params, bins, training):
    """``backward`` (the op, or a Triton launcher) of a random grad_out against the oracle evaluated from the
    same bn_input / mean / var."""
    n, c, s = pooled.shape
    nb, r = len(bins), params[0][0].shape[0]
    dtype, acc = pooled.dtype, acc_dtype(pooled.dtype)
    grad_out = rand(n, r, s, dtype=dtype, seed=7, device=pooled.device)
    args = (grad_out, pooled, bn_input, *params[:3], mean, var, list(bins), training, EPS)
    got = backward(*args)
    grad_pooled, grad_w, grad_bn_w, grad_bn_b = got
    assert grad_pooled.dtype == dtype and grad_pooled.shape == pooled.shape and grad_pooled.is_contiguous()
    assert grad_w.shape == (nb, r, c) and grad_bn_w.shape == grad_bn_b.shape == (nb, r)
    assert grad_w.dtype == grad_bn_w.dtype == grad_bn_b.dtype == acc
    oracle = reference.reduction_conv_bn_relu_backward(*map(f64, args))
    low = reference.reduction_conv_bn_relu_backward(*args)
    # The parameter gradients are compared stacked, i.e. normwise over all bins: a bin with N*b*b = 2 has an
    # (analytically) zero weight gradient in training, whose rounding noise is only meaningful relative to
    # the other bins' gradients.
    for what, t, lo, o in zip(("grad_pooled", "grad_conv_weights", "grad_bn_weights", "grad_bn_biases"),
                              got, low, oracle):
        assert_close_to_oracle(t, lo, o, what)


def forward_inputs(case, dtype, param_dtype, device):
    n, c, r, bins = case
    pooled = rand(n, c, packed_size(bins), dtype=dtype, seed=5, device=device)
    return pooled, branch_params(c, r, bins, param_dtype, device=device)


# --------------------------------------------------------------------------------------------------
# The kernel ops against the reference
# --------------------------------------------------------------------------------------------------

@modes
@per_backend_cases
@dtype_pairs
def test_forward(backend, dtype, param_dtype, case, training):
    bins = case[3]
    pooled, params = forward_inputs(case, dtype, param_dtype, backend.device)
    got = ops.reduction_conv_bn_relu(pooled, *params, list(bins), training, EPS)
    check_forward(got, pooled, params, bins, training)


@modes
@per_backend_cases
@dtype_pairs
def test_backward(backend, dtype, param_dtype, case, training):
    bins = case[3]
    pooled, params = forward_inputs(case, dtype, param_dtype, backend.device)
    _, bn_input, mean, var = ops.reduction_conv_bn_relu(pooled, *params, list(bins), training, EPS)
    check_backward(ops.reduction_conv_bn_relu_backward, pooled, bn_input, mean, var, params, bins, training)


@pytest.mark.parametrize("dtype,param_dtype,training", [
    (torch.float64, torch.float64, True), (torch.float64, torch.float64, False),
    (torch.float32, torch.float32, False), (torch.bfloat16, torch.float32, False),
    (torch.float32, torch.float32, True), (torch.bfloat16, torch.float32, True)],
    ids=["fp64-train", "fp64-eval", "fp32-eval", "bf16-fp32params-eval", "fp32-train", "bf16-fp32params-train"])
def test_many_tiles(backend, dtype, param_dtype, training):
    """C = 70, R = 67: several K steps and ragged row / channel tiles of the GEMMs (the Triton block configs
    are also run one by one below, at C = 72, R = 68). fp32 / bf16 training is judged too: bin 1's N*b*b = 2
    values amplify bn_input's rounding, in PyTorch's own result as much as in ours."""
    case = (2, 70, 67, B)
    pooled, params = forward_inputs(case, dtype, param_dtype, backend.device)
    got = ops.reduction_conv_bn_relu(pooled, *params, list(B), training, EPS)
    check_forward(got, pooled, params, B, training)
    check_backward(ops.reduction_conv_bn_relu_backward, pooled, *got[1:], params, B, training)


def test_relu_propagates_nan(backend):
    pooled = rand(2, 4, packed_size(B), dtype=torch.float32, seed=5, device=backend.device)
    pooled[0, 1, 3] = float("nan")
    params = branch_params(4, 3, B, torch.float32, device=backend.device)
    out = ops.reduction_conv_bn_relu(pooled, *params, list(B), False, EPS)[0]
    expected = reference.reduction_conv_bn_relu(pooled.double(), *map(f64, params), list(B), False, EPS)[0]
    assert out.isnan().any() and torch.equal(out.isnan(), expected.isnan())


# --------------------------------------------------------------------------------------------------
# The Triton launchers' block configs
# --------------------------------------------------------------------------------------------------

def triton_reduction_configs() -> list[str]:
    from psp_kernels.triton import reduction as tred
    assert set(tred.REDUCTION_FWD_CONFIGS) == set(tred.REDUCTION_BWD_CONFIGS)
    return list(tred.REDUCTION_FWD_CONFIGS)


@pytest.mark.backends("triton")
@modes
@pytest.mark.parametrize("config", triton_reduction_configs())
def test_triton_configs(backend, config, training):
    """Every block config (forward and backward) at M = 2*36 = 72 rows for bin 6, C = 72, R = 68: partial
    tiles in every GEMM dim of the big config."""
    from psp_kernels.triton import reduction as tred
    pooled, params = forward_inputs((2, 72, 68, B), torch.float32, torch.float32, backend.device)
    got = tred.reduction_conv_bn_relu(pooled, *params, list(B), training, EPS, config=config)
    check_forward(got, pooled, params, B, training)
    check_backward(lambda *args: tred.reduction_conv_bn_relu_backward(*args, config=config), pooled, *got[1:],
                   params, B, training)


@pytest.mark.backends("triton")
@modes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_triton_many_row_tiles(backend, dtype, training):
    """N = 8, "small" config (BLOCK_M = 16): bin 6's 288 rows are 18 row tiles, more than one BLOCK_T step of the
    ordered merges of the tiles' statistics (forward, training) and BatchNorm sums (backward)."""
    from psp_kernels.triton import reduction as tred
    tile_rows = tred.REDUCTION_FWD_CONFIGS["small"][0], tred.REDUCTION_BWD_CONFIGS["small"]["bn"][0]
    assert all(8 * 36 > tred.BLOCK_T.value * rows for rows in tile_rows)
    pooled, params = forward_inputs((8, 8, 4, B), dtype, dtype, backend.device)
    got = tred.reduction_conv_bn_relu(pooled, *params, list(B), training, EPS, config="small")
    check_forward(got, pooled, params, B, training)
    check_backward(lambda *args: tred.reduction_conv_bn_relu_backward(*args, config="small"), pooled, *got[1:],
                   params, B, training)


# --------------------------------------------------------------------------------------------------
# Autograd, opcheck
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,bins,fast", [(2, 3, B, True), (1, 2, B, False), (2, 3, (1, 3, 5), False)],
                         ids=["n2c3", "n1c2", "n2c3-b135"])
def test_gradcheck(backend, n, c, bins, fast):
    """Through the public function (R = 2); fast (random-projection) gradcheck on the first case and on
    Triton (interpreted kernels are slow; their gradients are also pinned to the reference above)."""
    fast = fast or backend.name == "triton"
    f64_ = dict(dtype=torch.float64, device=backend.device)
    pooled = torch.randn(n, c, packed_size(bins), **f64_).requires_grad_()
    conv_weights = [torch.randn(2, c, 1, 1, **f64_).requires_grad_() for _ in bins]
    bn_weights = [torch.rand(2, **f64_).requires_grad_() for _ in bins]
    bn_biases = [torch.randn(2, **f64_).requires_grad_() for _ in bins]
    running = [torch.rand(2, **f64_) + 0.5 for _ in bins]
    k = len(bins)
    for training in (True, False) if n > 1 else (False,):  # N=1 has one value per channel in bin 1
        def f(p, *ts):
            return reduction_conv_bn_relu(p, ts[:k], ts[k:2 * k], ts[2 * k:], [v.clone() for v in running],
                                          [v.clone() for v in running], bins, training=training)
        assert torch.autograd.gradcheck(f, (pooled, *conv_weights, *bn_weights, *bn_biases), fast_mode=fast)


@modes
def test_opcheck(backend, training):
    bins, f64_ = [1, 2, 3, 6], dict(dtype=torch.float64, device=backend.device)
    pooled = torch.randn(2, 3, 50, **f64_).requires_grad_()
    ws = [torch.randn(2, 3, 1, 1, **f64_).requires_grad_() for _ in bins]
    gs = [torch.rand(2, **f64_).requires_grad_() for _ in bins]
    bs = [torch.randn(2, **f64_).requires_grad_() for _ in bins]
    rs = [torch.rand(2, **f64_) + 0.5 for _ in bins]
    torch.library.opcheck(ops.reduction_conv_bn_relu.default, (pooled, ws, gs, bs, rs, rs, bins, training, EPS))
    pooled, ws, gs, bs = pooled.detach(), *([t.detach() for t in group] for group in (ws, gs, bs))
    _, bn_input, mean, var = ops.reduction_conv_bn_relu(pooled, ws, gs, bs, rs, rs, bins, training, EPS)
    grad_out = torch.randn(2, 2, 50, **f64_)   # the backward op has no autograd formula: no input needs grad
    torch.library.opcheck(ops.reduction_conv_bn_relu_backward.default,
                          (grad_out, pooled, bn_input, ws, gs, bs, mean, var, bins, training, EPS))


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

def run_all(device, dtype, param_dtype, training, small=False, c=64, r=384):
    """Forward and backward once on one fixed problem large enough to be split over threads (``small``:
    C = 3, R = 4, for the Triton interpreter)."""
    if small:
        c, r = 3, 4
    pooled = rand(2, c, packed_size(B), dtype=dtype, seed=13, device=device)
    params = branch_params(c, r, B, param_dtype, seed=17, device=device)
    grad_out = rand(2, r, packed_size(B), dtype=dtype, seed=19, device=device)
    out, bn_input, mean, var = ops.reduction_conv_bn_relu(pooled, *params, list(B), training, EPS)
    grads = ops.reduction_conv_bn_relu_backward(grad_out, pooled, bn_input, *params[:3], mean, var, list(B),
                                                training, EPS)
    return [out, bn_input, mean, var, *grads]



DETERMINISM_DTYPES = pytest.mark.parametrize(
    "dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16-fp32params", "bf16"])


@modes
@DETERMINISM_DTYPES
def test_bitwise_deterministic(backend, dtype, param_dtype, training):
    small = backend.name == "triton" and backend.device == "cpu"
    args = (backend.device, dtype, param_dtype, training, small)
    assert_bitwise(run_all(*args), run_all(*args), "two runs")


@pytest.mark.backends("cpp", devices=("cpu",))
@modes
@DETERMINISM_DTYPES
def test_cpp_bits_independent_of_thread_count(backend, threads, dtype, param_dtype, training):
    assert_bits_independent_of_thread_count(threads, lambda: run_all("cpu", dtype, param_dtype, training))


@pytest.mark.backends("cpp", devices=("cpu",))
def test_cpp_bits_independent_of_thread_count_at_semseg_size(backend, threads):
    """C = 2048, R = 512: sizes where a multi-threaded BLAS GEMM changes bits with the thread count (the C++
    kernels use a fixed-order GEMM)."""
    assert_bits_independent_of_thread_count(
        threads, lambda: run_all("cpu", torch.float32, torch.float32, True, c=2048, r=512))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def _args(n=2, c=3, r=2, bins=B, **over):
    args = dict(pooled=torch.randn(n, c, packed_size(bins)),
                conv_weights=[torch.randn(r, c, 1, 1) for _ in bins], bn_weights=[torch.ones(r) for _ in bins],
                bn_biases=[torch.zeros(r) for _ in bins], running_means=[torch.zeros(r) for _ in bins],
                running_vars=[torch.ones(r) for _ in bins], bins=bins)
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(pooled=torch.randn(2, 3, 49)), ValueError, "pooled must have S"),
    (dict(conv_weights=[torch.randn(2, 3, 1, 1)] * 3), ValueError, "conv_weights must hold one tensor per bin"),
    (dict(conv_weights=[torch.randn(2, 4, 1, 1)] * 4), ValueError,
     r"conv_weights\[0\] must have shape \(2, 3, 1, 1\)"),
    (dict(conv_weights=[torch.randn(2, 3, 1, 1, device="meta")] * 4), RuntimeError, r"conv_weights\[0\] is on meta"),
    (dict(bn_weights=[torch.ones(3)] * 4), ValueError, r"bn_weights\[0\] must"),
    (dict(running_vars=torch.ones(4, 2)), TypeError, "running_vars must be a list"),
], ids=["pooled-S", "conv_weights-count", "conv_weights-shape", "conv_weights-device", "bn_weights-shape",
        "running_vars-type"])
def test_bad_input_names_the_argument(over, error, match):
    with pytest.raises(error, match=match):
        reduction_conv_bn_relu(**_args(**over))


@pytest.mark.backends("cpp", "cuda")
def test_compiled_kernels_raise_on_bad_internal_arguments(backend):
    """The compiled kernels check what reaches them (never crash): per-bin lists, weight shapes, dtypes."""
    native, dev = torch.ops.psp_native, backend.device
    bins = [1, 2]
    s = packed_size(bins)
    params = branch_params(2, 3, bins, torch.float64, device=dev)
    with pytest.raises(RuntimeError, match="one tensor per bin"):
        native.reduction_conv_bn_relu(rand(1, 2, s, device=dev), params[0][:1], *params[1:], bins, True, EPS)
    with pytest.raises(RuntimeError, match=r"\[R, C, 1, 1\]"):
        native.reduction_conv_bn_relu(rand(1, 4, s, device=dev), *params, bins, True, EPS)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        native.reduction_conv_bn_relu_backward(
            rand(1, 3, s, device=dev), rand(1, 2, s, device=dev), rand(1, 3, s, dtype=torch.float32, device=dev),
            *params[:3], rand(2, 3, device=dev), rand(2, 3, device=dev).abs(), bins, True, EPS)

