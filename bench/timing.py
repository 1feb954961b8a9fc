"""Shared timing and roofline helpers for the benchmarks in bench/.

CPU: wall-clock medians (``time.perf_counter``) after warm-up. CUDA: ``triton.testing.do_bench`` with
quantiles (L2 flushed between reps, warm-up and rep in milliseconds). Ceilings are measured in the same
run: copy bandwidth counts the bytes read plus the bytes written.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def measure_ms(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1) -> list[float]:
    """Times of ``reps`` calls of ``fn`` in milliseconds (CUDA: do_bench's p50, p20, p80)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return list(do_bench(fn, warmup=25, rep=max(100, 20 * reps), quantiles=[0.5, 0.2, 0.8]))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, reps: int
                ) -> dict[str, dict[str, float]]:
    """Time every fn in ``rounds`` interleaved rounds; per fn the median of round medians and p20/p80."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(statistics.median(measure_ms(fn, device, reps)))
    out = {}
    for name, values in per_round.items():
        q = statistics.quantiles(values, n=5, method="inclusive") if len(values) > 1 else [values[0]] * 4
        out[name] = {"median_ms": statistics.median(values), "p20_ms": q[0], "p80_ms": q[3], "rounds": rounds}
    return out


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s on ``device``, read + write bytes counted."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(measure_ms(lambda: dst.copy_(src), device, reps))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict[str, str]:
    """Device, versions, git sha and date of this run, for the results files."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        import triton
        env.update(device=torch.cuda.get_device_name(device), triton=triton.__version__,
                   cuda=str(torch.version.cuda))
    else:
        env["device"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                env["device"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git"] = "unknown"
    return env
