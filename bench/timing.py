"""Shared timing and roofline helpers for the benchmarks in bench/.

CPU: wall-clock medians (``time.perf_counter``) after warm-up. CUDA: ``triton.testing.do_bench`` with
quantiles (L2 flushed before every rep, warm-up and rep in milliseconds). Ceilings are measured in the
same run: copy bandwidth counts the bytes read plus the bytes written.

Importing this module gives the benchmark process the allocator setting of pspnet's command-line tools
(:func:`pspnet.runtime.keep_freed_memory`: glibc keeps freed memory for reuse). With glibc's default every
large tensor is mapped afresh and page-faults in on every call, which made memory-bound timings here vary by
up to 2x between runs and charged each variant for its allocations rather than its kernels.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Hashable

import torch

from pspnet.runtime import keep_freed_memory

KEPT_FREED_MEMORY = keep_freed_memory()


def measure_ms(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1) -> list[float]:
    """Times of ``fn`` in ms. CPU: ``reps`` wall-clock calls after ``warmup``; CUDA: do_bench's [p50, p20, p80]."""
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


def round_median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median time of one round (CUDA: do_bench's p50; CPU: median of ``reps`` calls)."""
    times = measure_ms(fn, device, reps)
    return times[0] if device.type == "cuda" else statistics.median(times)


def summarize(values: list[float]) -> dict[str, float]:
    """Median and p20/p80 of per-round medians."""
    q = statistics.quantiles(values, n=5, method="inclusive") if len(values) > 1 else [values[0]] * 4
    return {"median_ms": statistics.median(values), "p20_ms": q[0], "p80_ms": q[3], "rounds": len(values)}


def interleaved(fns: dict[Hashable, Callable[[], object]], device: torch.device, rounds: int, reps: int
                ) -> dict[Hashable, dict[str, float]]:
    """Time every fn in ``rounds`` interleaved rounds; per fn the median of round medians and p20/p80."""
    per_round: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(round_median_ms(fn, device, reps))
    return {name: summarize(values) for name, values in per_round.items()}


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s, read + write bytes counted.

    ``nbytes`` is the size of src (default 2 GiB on CUDA, 1 GiB on CPU); CUDA takes do_bench's p50
    (many reps, L2 flushed), CPU the median of ``reps`` calls.
    """
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 1 << 30)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = round_median_ms(lambda: dst.copy_(src), device, reps)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_slug(device: torch.device) -> str:
    """File-name slug of the device: ``cpu``, or the GPU name (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict[str, object]:
    """Device, versions, git sha and date of this run, for the results files."""
    env: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": KEPT_FREED_MEMORY, "cpu_isa": os.environ.get("PSP_KERNELS_CPU_ISA", "widest")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version,clocks.max.sm,"
                    "clocks.max.mem", "--format=csv,noheader"])
        driver, sm_clock, mem_clock = ([s.strip() for s in smi.split(",")] + [None] * 3)[:3] if smi else [None] * 3
        env.update(device=props.name, sms=props.multi_processor_count,
                   l2_bytes=getattr(props, "L2_cache_size", None), memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}", driver=driver, max_sm_clock=sm_clock,
                   max_mem_clock=mem_clock, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        env["device"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                env["device"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    env["git"] = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = None if status is None else bool(status)
    return env


def write_results(out_dir: str | Path, name: str, device: torch.device, payload: dict, markdown: str) -> Path:
    """Write ``<out_dir>/<name>_<device>_<date>.json`` (``payload``, whose ``env`` holds the date) and ``.md``;
    print the markdown and the paths. Returns the common stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{device_slug(device)}_{str(payload['env']['date'])[:10]}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.json/.md")
    return stem
