"""pytest-benchmark suite for the PPM ops and PyramidPooling, per backend, to compare runs for regressions.

    python -m pytest bench --benchmark-json out.json
    python -m pytest bench --benchmark-autosave                     # stores .benchmarks/<machine>/NNNN_*.json
    python -m pytest bench --benchmark-compare --benchmark-compare-fail=median:5%

CPU rows (backends ``cpp`` and ``reference``): N=2, C=512, 60x60 fp32, NCHW and channels_last. GPU rows
(backends ``triton`` and ``cuda``, N=8, C=2048, 60x60 bf16) skip without a CUDA GPU or when the backend is
not available. pytest-benchmark times host wall-clock per call (a CUDA step ends with a synchronize, and
no L2 flush), right for comparing runs; GPU rows also store ``triton.testing.do_bench``'s kernel time
(L2 flushed) in ``extra_info``. Shape, dtype, layout, backend and mode are in ``extra_info`` of every row.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import psp_kernels  # noqa: E402
from psp_kernels.dispatch import backend_devices  # noqa: E402

BINS = (1, 2, 3, 6)
S = sum(b * b for b in BINS)
SHAPES = {"cpu": (2, 512, 60, torch.float32), "cuda": (8, 2048, 60, torch.bfloat16)}  # N, C, H=W, dtype
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ROUNDS, WARMUP_ROUNDS = 8, 2
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = [pytest.param(("cpu", b), id=f"cpu-{b}") for b in ("cpp", "reference")] + [
    pytest.param(("cuda", b), id=f"cuda-{b}", marks=NO_GPU) for b in ("triton", "cuda")]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]


class Case:
    """Device, backend, shape and layout of one benchmark, its inputs, and the timing call."""

    def __init__(self, target: tuple[str, str], channels_last: bool = False):
        device, self.backend = target
        self.device = torch.device(device)
        try:
            backend_devices(self.backend, self.device.type)
        except (ValueError, RuntimeError, ImportError) as err:
            pytest.skip(f"backend {self.backend!r} unavailable: {err}")
        self.n, self.c, self.size, self.dtype = SHAPES[device]
        self.r = self.c // 4
        self.channels_last = channels_last

    def randn(self, *shape: int, layout: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout and self.channels_last else t

    def x(self) -> torch.Tensor:
        return self.randn(self.n, self.c, self.size, self.size, layout=True)

    def reduction_args(self) -> tuple[list[torch.Tensor], ...]:
        """Per bin: conv weight [R, C, 1, 1], BN weight, bias, running mean, running var."""
        nb, r = len(BINS), self.r
        kw = {"device": self.device, "dtype": self.dtype}
        return ([torch.randn(r, self.c, 1, 1, **kw) / self.c ** 0.5 for _ in range(nb)],
                [torch.rand(r, **kw) + 0.5 for _ in range(nb)], [torch.randn(r, **kw) * 0.1 for _ in range(nb)],
                [torch.randn(r, **kw) * 0.1 for _ in range(nb)], [torch.rand(r, **kw) + 0.5 for _ in range(nb)])

    def run(self, benchmark, op: str, fn: Callable[[], object], **extra) -> None:
        """Time ``fn`` under this case's backend with ``benchmark.pedantic``; shape etc. into extra_info."""
        def call():
            with psp_kernels.use_backend(self.backend, self.device.type):
                fn()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def step():
            call()
            sync()
        benchmark.group = op
        benchmark.extra_info.update(
            op=op, backend=self.backend, device=self.device.type, N=self.n, C=self.c, H=self.size, W=self.size,
            dtype=DTYPE_NAMES[self.dtype], layout="channels_last" if self.channels_last else "nchw",
            **extra)
        if self.device.type == "cuda":
            from triton.testing import do_bench
            benchmark.extra_info["do_bench_ms_p50_p20_p80"] = do_bench(call, warmup=25, rep=100,
                                                                       quantiles=[0.5, 0.2, 0.8])
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("target", TARGETS)
def test_multibin_avg_pool_fwd(benchmark, target, channels_last):
    case = Case(target, channels_last)
    x = case.x()
    with torch.no_grad():
        case.run(benchmark, "multibin_avg_pool fwd", lambda: psp_kernels.multibin_avg_pool(x, BINS))


@pytest.mark.parametrize("training", [pytest.param(False, id="eval"), pytest.param(True, id="train")])
@pytest.mark.parametrize("target", TARGETS)
def test_reduction_conv_bn_relu_fwd(benchmark, target, training):
    case = Case(target)
    pooled = case.randn(case.n, case.c, S)
    args = case.reduction_args()
    with torch.no_grad():
        case.run(benchmark, "reduction_conv_bn_relu fwd",
                 lambda: psp_kernels.reduction_conv_bn_relu(pooled, *args, BINS, training=training),
                 mode="train" if training else "eval")


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("target", TARGETS)
def test_upsample_concat_fwd(benchmark, target, channels_last):
    case = Case(target, channels_last)
    x, branches = case.x(), case.randn(case.n, case.r, S)
    with torch.no_grad():
        case.run(benchmark, "upsample_concat fwd", lambda: psp_kernels.upsample_concat(x, branches, BINS))


def pyramid_pooling(case: Case, training: bool) -> psp_kernels.PyramidPooling:
    module = psp_kernels.PyramidPooling(case.c, case.r, BINS).to(case.device, case.dtype).train(training)
    return module.to(memory_format=torch.channels_last) if case.channels_last else module


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("target", TARGETS)
def test_pyramid_pooling_fwd(benchmark, target, channels_last):
    case = Case(target, channels_last)
    module, x = pyramid_pooling(case, training=False), case.x()
    with torch.no_grad():
        case.run(benchmark, "PyramidPooling fwd (eval)", lambda: module(x), mode="eval")


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("target", TARGETS)
def test_pyramid_pooling_fwd_bwd(benchmark, target, channels_last):
    case = Case(target, channels_last)
    module = pyramid_pooling(case, training=True)
    x = case.x().requires_grad_()
    g = case.randn(case.n, case.c + len(BINS) * case.r, case.size, case.size, layout=True)
    params = [x, *module.parameters()]

    def step():
        for t in params:
            t.grad = None
        module(x).backward(g)
    case.run(benchmark, "PyramidPooling fwd+bwd (train)", step, mode="train")
