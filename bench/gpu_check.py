"""One-shot GPU check: GPU tests, determinism, a PSPNet-50 training step and a reduced benchmark matrix.

    python bench/gpu_check.py --out DIR [--seconds 420] [--device cuda] [--small]

Run by ``scripts/gpu_check.sh`` after set-up and the CUDA build; usable alone on a machine where the
extension is built. Stages, each in its own time budget so one slow stage cannot eat the loan:

1. ``environment``: device, driver, CUDA, torch, triton, which compiled kernels are registered for CUDA;
2. ``tests``: ``pytest tests -k cuda --triton compiled`` (the CUDA backends of every per-op test module);
3. ``determinism``: the fused PPM and head forward+backward 10 times under
   ``torch.use_deterministic_algorithms(True)``: every run's bits equal the first's; with two GPUs also
   the same op on a tensor on a non-current device against the current one;
4. ``ppm``, ``head``, ``conv``: ``bench/{ppm,head,conv}_bench.py`` on a reduced matrix (PPM N=1/8/16 60x60
   bf16 and fp32; head N=8; backbone layer rows at N=8 60x60 bf16, PSPNet-50 inference N=1 and 16 at 473
   and the bf16 training step N=8 at 473, fused vs unfused, three interleaved rounds), without the
   torch.compile baselines (their compile time would not fit a 15-minute loan).

Writes into DIR: ``environment.json``, ``determinism.json``, one ``<stage>.log`` per subprocess stage, the
benchmarks' ``.json``/``.md``/``.png`` files, and ``summary.md`` (every stage's status, seconds and result
line); prints DIR. Exits 0 when every stage passed, 1 otherwise (the files are written either way).
``--small`` runs every stage at tiny shapes (and on ``--device cpu``), which is how the CPU tests run it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]  # timing.py, and this checkout's psp_kernels
from timing import environment as bench_environment  # noqa: E402

#: the compiled kernels whose CUDA registration the environment stage reports
NATIVE_OPS = ("multibin_avg_pool", "reduction_conv_bn_relu", "upsample_concat", "folded_conv")


@dataclass
class Stage:
    """One stage's outcome: ``status`` is ``ok``, ``failed`` (with ``detail``), ``timeout`` or ``skipped``."""
    name: str
    status: str = "skipped"
    seconds: float = 0.0
    detail: str = ""
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """Machine and software facts, and whether each compiled kernel is registered for the device's key."""
    env = dict(bench_environment(device), platform=platform.platform(), gpus=torch.cuda.device_count())
    try:
        env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        env["nvcc"] = None
    importlib.import_module("psp_kernels")   # loads the compiled kernels
    key = "CUDA" if device.type == "cuda" else "CPU"
    env["native_kernels"] = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"psp_native::{op}", key)
                             for op in NATIVE_OPS}
    return env


def run_subprocess(stage: Stage, argv: list[str], log: Path, seconds: float, summary_line: Callable[[str], str]
                   ) -> Stage:
    """Run ``argv`` from the repository root with a time limit, its output into ``log``."""
    if seconds < 5:
        stage.status, stage.detail = "skipped", "no time left"
        return stage
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=seconds,
                                env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        except subprocess.TimeoutExpired:
            rc = None
    stage.seconds = round(time.perf_counter() - start, 1)
    stage.files.append(log.name)
    text = log.read_text(errors="replace")
    stage.detail = summary_line(text)
    stage.status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    return stage


def last_line_with(*words: str) -> Callable[[str], str]:
    """A summary for :func:`run_subprocess`: the last output line holding any of ``words``, else the last line."""
    def pick(text: str) -> str:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        hits = [line for line in lines if any(w in line for w in words)]
        return (hits or lines or [""])[-1][:300]
    return pick


def _ppm_and_head_runs(device: torch.device, dtype: torch.dtype, small: bool) -> Callable[[], list[torch.Tensor]]:
    """One fused PPM and concat-free head forward+backward (training mode) on fixed inputs; returns every
    output and gradient."""
    from psp_kernels import PSPHead
    n, c, size, out_channels = (2, 8, 13, 8) if small else (2, 2048, 60, 512)   # semseg: R = C / 4
    torch.manual_seed(0)
    head = PSPHead(c, c // 4, out_channels, fused=True).to(device).train()
    x0 = torch.randn(n, c, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, out_channels, size, size, device=device, dtype=dtype)

    def run() -> list[torch.Tensor]:
        x = x0.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = head(x)
        out.backward(g.to(out.dtype))
        return [out.detach(), x.grad] + [p.grad for p in head.parameters()]
    return run


def determinism(device: torch.device, runs: int = 10, small: bool = False) -> dict:
    """``runs`` forward+backward passes of the fused PPM + head with deterministic algorithms on; per dtype
    whether every run matched the first bit for bit. With two CUDA devices, also cuda:1 (not current)
    against cuda:0."""
    result: dict[str, object] = {"runs": runs}
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            run = _ppm_and_head_runs(device, dtype, small)
            first = run()
            same = all(all(torch.equal(a, b) for a, b in zip(first, run())) for _ in range(runs - 1))
            result[str(dtype).replace("torch.", "")] = same
        if device.type == "cuda" and torch.cuda.device_count() >= 2:
            with torch.cuda.device(0):
                here = _ppm_and_head_runs(torch.device("cuda:0"), torch.float32, small)()
                there = _ppm_and_head_runs(torch.device("cuda:1"), torch.float32, small)()
            result["non_current_device"] = all(torch.equal(a, b.to("cuda:0")) for a, b in zip(here, there))
        else:
            result["non_current_device"] = "skipped: one GPU"
    finally:
        torch.use_deterministic_algorithms(before)
    return result


def benchmark_commands(device: str, out: Path, small: bool) -> dict[str, list[str]]:
    """The reduced benchmark matrix, one command per benchmark script."""
    py, common = sys.executable, ["--device", device, "--out", str(out), "--rounds", "1" if small else "3"]
    if small:
        return {
            "ppm": [py, "bench/ppm_bench.py", *common, "--batch", "2", "--channels", "8", "--size", "13",
                    "--dtype", "fp32", "--no-compile", "--copy-mib", "8"],
            "head": [py, "bench/head_bench.py", *common, "--batch", "2", "--channels", "8", "--size", "13",
                     "--dtype", "fp32", "--no-compile", "--no-model"],
            "conv": [py, "bench/conv_bench.py", *common, "--batch", "1", "--size", "9", "--dtype", "fp32",
                     "--no-compile", "--no-model"],
        }
    return {
        "ppm": [py, "bench/ppm_bench.py", *common, "--batch", "1", "8", "16", "--size", "60",
                "--dtype", "bf16", "fp32", "--no-compile"],
        "head": [py, "bench/head_bench.py", *common, "--batch", "8", "--size", "60", "--dtype", "bf16", "fp32",
                 "--no-compile", "--no-model"],
        "conv": [py, "bench/conv_bench.py", *common, "--batch", "8", "--size", "60", "--dtype", "bf16",
                 "--no-compile", "--model-size", "473", "--model-batch", "1", "16", "--train-step",
                 "--step-batch", "8", "--step-size", "473"],
    }


#: share of the time left that each subprocess stage may use at most (the rest stays for later stages)
SHARES = {"tests": 0.45, "ppm": 0.45, "head": 0.3, "conv": 0.9}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def summary_markdown(stages: list[Stage], env: dict) -> str:
    lines = ["# GPU check", "", f"device: {env.get('device')} ({env.get('gpus')} GPU), driver {env.get('driver')}, "
             f"CUDA {env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}", "",
             "| stage | status | seconds | result | files |", "|---|---|---|---|---|"]
    for s in stages:
        detail = s.detail.replace("|", "/")
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {detail} | {', '.join(s.files)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for every result file (created)")
    p.add_argument("--seconds", type=float, default=420, help="time budget of all stages together")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (for the CPU tests)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.seconds
    stages: list[Stage] = []

    def left() -> float:
        return deadline - time.perf_counter()

    start = time.perf_counter()
    env = environment(device)
    (out / "environment.json").write_text(json.dumps(env, indent=1, default=str))
    missing = [op for op, ok in env["native_kernels"].items() if not ok]
    stages.append(Stage("environment", "failed" if missing else "ok", round(time.perf_counter() - start, 1),
                        f"compiled kernels missing for {device.type}: {missing}" if missing
                        else "every compiled kernel registered", ["environment.json"]))

    where, selection = (("tests/test_pooling.py", f"test_forward and {device.type}-reference") if args.small
                        else ("tests", device.type))
    tests = [sys.executable, "-m", "pytest", where, "-q", "-p", "no:cacheprovider", "-k", selection,
             "--durations=10"]
    if not args.small:
        tests += ["--triton", "compiled"]
        if importlib.util.find_spec("xdist") is not None:   # Triton's JIT compiles are CPU-bound: 8 workers
            tests += ["-n", "8"]
    stages.append(run_subprocess(Stage("tests"), tests, out / "tests.log", left() * SHARES["tests"],
                                 last_line_with(" passed", " failed", " error")))

    stage, start = Stage("determinism"), time.perf_counter()
    try:
        det = determinism(device, runs=3 if args.small else 10, small=args.small)
        (out / "determinism.json").write_text(json.dumps(det, indent=1))
        stage.files.append("determinism.json")
        bad = [k for k, v in det.items() if v is False]
        stage.status = "failed" if bad else "ok"
        stage.detail = f"bits differ: {bad}" if bad else ", ".join(f"{k}: {v}" for k, v in det.items())
    except Exception as err:  # noqa: BLE001 - the report says what broke; later stages still run
        stage.status, stage.detail = "failed", f"{type(err).__name__}: {err}"[:300]
    stage.seconds = round(time.perf_counter() - start, 1)
    stages.append(stage)

    for name, cmd in benchmark_commands(args.device, out, args.small).items():
        before = set(out.iterdir())
        stage = run_subprocess(Stage(name), cmd, out / f"{name}_bench.log", left() * SHARES[name],
                               last_line_with("wrote", "Error", "error"))
        stage.files += sorted(f.name for f in set(out.iterdir()) - before if f.name != f"{name}_bench.log")
        stages.append(stage)

    (out / "summary.md").write_text(summary_markdown(stages, env))
    (out / "stages.json").write_text(json.dumps([asdict(s) for s in stages], indent=1))
    print((out / "summary.md").read_text())
    print(f"gpu_check: results in {out}")
    return 0 if all(s.status == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
