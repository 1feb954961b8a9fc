"""PPM benchmark: fused ops vs eager semseg PPM (NCHW, channels_last) vs torch.compile, interleaved.

    python bench/ppm_bench.py [--device cpu|cuda] [--batch N ...] [--channels 2048] [--size H ...]
        [--dtype fp32|fp16|bf16 ...] [--impls NAME ...] [--rounds 5] [--reps 3] [--no-compile]
        [--compile-mode MODE] [--copy-mib MIB] [--out bench/results]

Defaults: on CUDA the matrix N 1/8/16 x H=W 60/90 x fp32/fp16/bf16 with eager NCHW, eager channels_last,
torch.compile (max-autotune), fused Triton and fused CUDA backends; on CPU N=2, 60x60, fp32 with eager
NCHW, eager channels_last, torch.compile (default mode) and the fused C++ backend.

Every implementation runs the same module weights on the same input, forward (eval, no grad) and
forward+backward (train mode, backward of a fixed random gradient), in interleaved rounds in one process;
on CUDA also forward replayed from a CUDA graph (eager and fused). Per row: median time and p20/p80 over
rounds, the modelled minimum bytes (fwd: read x + write the concat = 3P, fwd+bwd 6P, P = bytes of x), GB/s
and % of the copy bandwidth measured in the same run, speedups over eager NCHW, eager channels_last and
torch.compile, relative error vs an fp64 reference, whether two runs gave the same bits, and on CUDA the
kernel launches and peak extra memory of one call. Writes ``<out>/ppm_<device>_<date>.{json,md,png}``
with PASS/FAIL lines for the issue's targets. An unavailable backend or a failing baseline is reported
as a row with the reason (status ``unavailable`` / ``failed``); the run goes on. N=1 has no fwd+bwd rows
(status ``skipped``: BatchNorm in training needs more than one value per channel in bin 1).

CUDA timing is ``triton.testing.do_bench`` (L2 flushed before every rep), graph rows included (the
graph's replay is timed the same way). torch.compile max-autotune costs tens of seconds per config and
case: restrict the matrix (``--batch 8 16 --dtype bf16``) or use ``--no-compile`` for quick runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # timing.py, and this checkout's psp_kernels
from timing import copy_bandwidth_gbps, device_slug, environment, interleaved  # noqa: E402

import psp_kernels  # noqa: E402
from psp_kernels.dispatch import backend_devices  # noqa: E402
from psp_kernels.reference import SemsegPPM  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BINS = (1, 2, 3, 6)
CASES = (("fwd", False), ("fwd+bwd", True))  # (case, train)
BYTES_PER_P = {"fwd": 3, "fwd+bwd": 6}  # docs/ppm_byte_model.md (whole-PPM op): the minimum


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str                   # "eager" | "compile" | "fused"
    channels_last: bool = False
    backend: str | None = None  # psp_kernels backend of a fused impl, selected inside the timed closure

    @property
    def backend_label(self) -> str:
        return self.backend or {"eager": "aten", "compile": "inductor"}[self.kind]


IMPLS = {i.name: i for i in (
    Impl("eager_nchw", "eager"), Impl("eager_cl", "eager", channels_last=True), Impl("compile", "compile"),
    Impl("fused_triton", "fused", backend="triton"), Impl("fused_cuda", "fused", backend="cuda"),
    Impl("fused_cpp", "fused", backend="cpp"))}
DEFAULTS = {  # per device type: impls, batch, size, dtype
    "cuda": (["eager_nchw", "eager_cl", "compile", "fused_triton", "fused_cuda"], [1, 8, 16], [60, 90],
             ["fp32", "fp16", "bf16"]),
    "cpu": (["eager_nchw", "eager_cl", "compile", "fused_cpp"], [2], [60], ["fp32"]),
}
BASELINES = ("eager_nchw", "eager_cl", "compile")
ROW_KEYS = ("suite", "case", "impl", "backend", "N", "C", "H", "W", "dtype", "layout", "graph", "status", "error",
            "median_ms", "p20_ms", "p80_ms", "rounds", "model_bytes", "predicted_ms", "gbps", "pct_copy_bw",
            "copy_bw_gbps",
            *(f"speedup_vs_{b}" for b in BASELINES), "rel_err", "rel_err_parts", "deterministic_bitwise",
            "launches", "peak_mem_bytes")


@dataclass(frozen=True)
class Config:
    n: int
    c: int
    size: int
    dtype: str

    @property
    def label(self) -> str:
        return f"N{self.n} C{self.c} {self.size}x{self.size} {self.dtype}"


# ------------------------------------------------------------------------------------------------
# Modules and closures
# ------------------------------------------------------------------------------------------------

def make_state(c: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One set of random weights and BN statistics, rounded to ``dtype`` (the fp64 oracle uses the same values)."""
    torch.manual_seed(0)
    ref = SemsegPPM(c, c // 4, BINS)
    with torch.no_grad():
        for f in ref.features:
            f[2].weight.uniform_(0.5, 1.5), f[2].bias.uniform_(-0.5, 0.5)
            f[2].running_mean.uniform_(-0.1, 0.1), f[2].running_var.uniform_(0.5, 2.0)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()}


def new_module(cls: type, state: dict, cfg: Config, device: torch.device, dtype: torch.dtype,
               channels_last: bool = False) -> torch.nn.Module:
    module = cls(cfg.c, cfg.c // 4, BINS)
    module.load_state_dict(state)
    module = module.to(device, dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def unavailable_reason(impl: Impl, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` (its backend has no kernel there), or None."""
    if impl.backend is None:
        return None
    try:
        backend_devices(impl.backend, device.type)
    except (ValueError, RuntimeError, ImportError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class Prepared:
    impl: Impl
    module: Callable    # the module, or its torch.compile wrapper
    base: torch.nn.Module
    x: torch.Tensor     # x in the impl's layout
    g: torch.Tensor     # output gradient in the impl's layout


def build(names: list[str], cfg: Config, device: torch.device, compile_mode: str | None, x: torch.Tensor,
          g: torch.Tensor) -> tuple[dict[str, Prepared], dict[str, str], torch.nn.Module]:
    """Prepared impls, the reasons of the unavailable ones, and the fp64 oracle (semseg's module)."""
    dtype = DTYPES[cfg.dtype]
    state = make_state(cfg.c, dtype)
    prepared, unavailable = {}, {}
    for name in names:
        impl = IMPLS[name]
        reason = unavailable_reason(impl, device)
        if reason:
            unavailable[name] = reason
            continue
        cls = psp_kernels.PyramidPooling if impl.kind == "fused" else SemsegPPM
        base = new_module(cls, state, cfg, device, dtype, impl.channels_last)
        module = base
        if impl.kind == "compile":
            torch._dynamo.reset()  # a fresh compile per config: no recompile limit, no dynamic shapes
            module = torch.compile(base, mode=compile_mode, dynamic=False)
        fmt = torch.channels_last if impl.channels_last else torch.contiguous_format
        prepared[name] = Prepared(impl, module, base, x.contiguous(memory_format=fmt),
                                  g.contiguous(memory_format=fmt))
    oracle = new_module(SemsegPPM, state, cfg, device, torch.float64)
    return prepared, unavailable, oracle


def runner(p: Prepared, train: bool, device: torch.device) -> Callable[[], list[torch.Tensor]]:
    """Zero-argument closure: eval forward (returns [out]) or train forward + backward of g (returns grads).

    The fused impl's backend is selected inside the closure; gradients are reset to None on every call.
    """
    p.base.train(train)
    backend = (lambda: psp_kernels.use_backend(p.impl.backend, device.type)) if p.impl.backend \
        else contextlib.nullcontext
    graphed_compile = p.impl.kind == "compile" and device.type == "cuda"  # max-autotune: cudagraph trees
    params = list(p.base.parameters())
    if not train:
        def forward():
            with torch.no_grad(), backend():
                if graphed_compile:
                    torch.compiler.cudagraph_mark_step_begin()
                return [p.module(p.x)]
        return forward
    xg = p.x.detach().requires_grad_()

    def step():
        xg.grad = None
        for q in params:
            q.grad = None
        with torch.enable_grad(), backend():
            if graphed_compile:
                torch.compiler.cudagraph_mark_step_begin()
            p.module(xg).backward(p.g)
        return [xg.grad, *(q.grad for q in params)]
    return step


def cuda_graph(fn: Callable[[], list[torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
    """Capture ``fn`` (after warm-up on a side stream) in a CUDA graph; returns its replay (static outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    replay.graph = graph  # keep the graph alive with the closure
    return replay


# ------------------------------------------------------------------------------------------------
# Correctness and GPU counters
# ------------------------------------------------------------------------------------------------

def oracle_result(oracle: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, train: bool) -> list[torch.Tensor]:
    """fp64 reference: [out] (eval) or [grad x, grad of every parameter] (train), same order as ``runner``."""
    oracle.train(train)
    x64 = x.double().requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = oracle(x64)
    if not train:
        return [out]
    params = list(oracle.parameters())
    for q in params:
        q.grad = None
    out.backward(g.double())
    return [x64.grad, *(q.grad for q in params)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (a.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def quality(fn: Callable[[], list[torch.Tensor]], ref: list[torch.Tensor], train: bool) -> dict:
    """Relative error vs the fp64 reference (max over outputs) and bitwise equality of two runs."""
    a = [t.detach().clone() for t in fn()]
    b = [t.detach().clone() for t in fn()]
    errs = [rel_err(t, r) for t, r in zip(a, ref)]
    parts = {"grad_x": errs[0], "grad_params": max(errs[1:], default=0.0)} if train else {"out": errs[0]}
    return {"rel_err": max(errs), "rel_err_parts": parts,
            "deterministic_bitwise": all(torch.equal(s, t) for s, t in zip(a, b))}


def gpu_counters(fn: Callable[[], object], device: torch.device) -> dict:
    """CUDA kernels (and memset/memcpy ops) launched by one call, and its peak memory above what was allocated."""
    if device.type != "cuda":
        return {"launches": None, "peak_mem_bytes": None}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA and e.name != "Context Sync")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"launches": launches, "peak_mem_bytes": torch.cuda.max_memory_allocated() - base}


def first_line(err: BaseException) -> str:
    """Exception type and the start of its message on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


# ------------------------------------------------------------------------------------------------
# One config: correctness, timing, rows
# ------------------------------------------------------------------------------------------------

def new_row(cfg: Config, case: str, impl: Impl, graph: bool, **fields) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(suite="ppm", case=case, impl=impl.name, backend=impl.backend_label, N=cfg.n, C=cfg.c, H=cfg.size,
               W=cfg.size, dtype=cfg.dtype, layout="channels_last" if impl.channels_last else "nchw", graph=graph)
    row.update(fields)
    return row


def run_case(prepared: dict[str, Prepared], oracle, cfg: Config, case: str, train: bool, device: torch.device,
             args, copy_bw: float, x: torch.Tensor, g: torch.Tensor) -> list[dict]:
    """Rows of one case (fwd or fwd+bwd) of one config: check every impl, time the ones that work."""
    try:
        ref = oracle_result(oracle, x, g, train)
    except ValueError as err:  # N=1 in training: BatchNorm needs more than one value per channel (bin 1)
        return [new_row(cfg, case, p.impl, False, status="skipped", error=first_line(err)) for p in prepared.values()]
    fns, checked, rows = {}, {}, []
    variants = [(name, False) for name in prepared]
    if device.type == "cuda" and not train:  # the CUDA-graph column: eager and fused forward
        variants += [(name, True) for name, p in prepared.items() if p.impl.kind != "compile"]
    for name, graph in variants:
        try:
            fn = runner(prepared[name], train, device)
            fn = cuda_graph(fn) if graph else fn
            checked[name, graph] = {**quality(fn, ref, train), **gpu_counters(fn, device)}
            fns[name, graph] = fn
        except Exception as err:  # noqa: BLE001 - a failing impl is a result, not a crash
            rows.append(new_row(cfg, case, prepared[name].impl, graph, status="failed", error=first_line(err)))
    del ref
    times = interleaved(fns, device, args.rounds, args.reps)
    model_bytes = BYTES_PER_P[case] * x.numel() * x.element_size()
    for (name, graph), t in times.items():
        gbps = model_bytes / (t["median_ms"] * 1e-3) / 1e9
        speedups = {f"speedup_vs_{b}": times[b, False]["median_ms"] / t["median_ms"] if (b, False) in times
                    else None for b in BASELINES}
        rows.append(new_row(cfg, case, prepared[name].impl, graph, status="ok", **t, model_bytes=model_bytes,
                            predicted_ms=model_bytes / (copy_bw * 1e9) * 1e3, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw, copy_bw_gbps=copy_bw, **speedups,
                            **checked[name, graph]))
    return rows


def run_config(cfg: Config, names: list[str], device: torch.device, args, copy_bw: float) -> list[dict]:
    """All rows of one (N, C, H=W, dtype): both cases, unavailable impls as rows with the reason."""
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(1)
    x = torch.randn(cfg.n, cfg.c, cfg.size, cfg.size, device=device, dtype=dtype)
    g = torch.randn(cfg.n, cfg.c + len(BINS) * (cfg.c // 4), cfg.size, cfg.size, device=device, dtype=dtype)
    prepared, unavailable, oracle = build(names, cfg, device, args.compile_mode, x, g)
    rows = []
    for case, train in CASES:
        rows += [new_row(cfg, case, IMPLS[name], False, status="unavailable", error=why)
                 for name, why in unavailable.items()]
        rows += run_case(prepared, oracle, cfg, case, train, device, args, copy_bw, x, g)
    return rows


def run(args) -> tuple[list[dict], dict]:
    """Every config of the matrix; results files are rewritten after each config."""
    device = torch.device(args.device)
    names, batches, sizes, dtypes = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    names = [n for n in (args.impls or names) if not (args.no_compile and n == "compile")]
    configs = [Config(n, args.channels, s, d) for d, n, s in itertools.product(
        args.dtype or dtypes, args.batch or batches, args.size or sizes)]
    env = environment(device)
    copy_bw = copy_bandwidth_gbps(device, args.copy_mib << 20 if args.copy_mib else None)
    env["copy_bw_gbps"] = copy_bw
    rows: list[dict] = []
    for cfg in configs:
        print(f"{cfg.label} ...", flush=True)
        rows += run_config(cfg, names, device, args, copy_bw)
        write_results(rows, env, args, device, plot_png=False)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, env


# ------------------------------------------------------------------------------------------------
# Targets, report
# ------------------------------------------------------------------------------------------------

N_BIG = {"N": (8, 16), "dtype": ("bf16", "fp32"), "graph": False}
CHECKS = {  # (label, row filter, field, comparison, threshold), applied to every fused impl
    "cuda": [
        ("fwd >= 85% copy BW on 3P", {"case": "fwd", **N_BIG}, "pct_copy_bw", ">=", 85.0),
        ("fwd >= 5x eager NCHW", {"case": "fwd", **N_BIG}, "speedup_vs_eager_nchw", ">=", 5.0),
        ("fwd >= 3x eager CL", {"case": "fwd", **N_BIG}, "speedup_vs_eager_cl", ">=", 3.0),
        ("fwd >= 2x compile", {"case": "fwd", **N_BIG}, "speedup_vs_compile", ">=", 2.0),
        ("fwd+bwd >= 80% copy BW on 6P", {"case": "fwd+bwd", **N_BIG}, "pct_copy_bw", ">=", 80.0),
        ("fwd+bwd >= 10x eager NCHW", {"case": "fwd+bwd", **N_BIG}, "speedup_vs_eager_nchw", ">=", 10.0),
        ("fwd+bwd >= 3x compile", {"case": "fwd+bwd", **N_BIG}, "speedup_vs_compile", ">=", 3.0),
        ("fwd+bwd bitwise deterministic", {"case": "fwd+bwd"}, "deterministic_bitwise", "==", True),
        ("N=1 fwd 60x60 graph replay <= 30 us", {"case": "fwd", "N": (1,), "H": (60,), "graph": True},
         "median_ms", "<=", 0.030),
        ("N=1 fwd 90x90 graph replay <= 45 us", {"case": "fwd", "N": (1,), "H": (90,), "graph": True},
         "median_ms", "<=", 0.045),
        ("N=1 fwd <= 4 launches", {"case": "fwd", "N": (1,), "graph": False}, "launches", "<=", 4),
        ("rel err <= 1e-5 (fp32)", {"dtype": ("fp32",)}, "rel_err", "<=", 1e-5),
        ("fwd rel err <= 1e-2 (fp16, bf16)", {"case": "fwd", "dtype": ("fp16", "bf16")}, "rel_err", "<=", 1e-2),
    ],
    "cpu": [
        ("fwd+bwd >= 2x eager NCHW", {"case": "fwd+bwd"}, "speedup_vs_eager_nchw", ">=", 2.0),
        # bf16 (issue 14): >= 3x the faster eager layout, i.e. >= 3x each of them
        ("fwd+bwd bf16 >= 3x eager NCHW", {"case": "fwd+bwd", "dtype": ("bf16",)}, "speedup_vs_eager_nchw", ">=", 3.0),
        ("fwd+bwd bf16 >= 3x eager CL", {"case": "fwd+bwd", "dtype": ("bf16",)}, "speedup_vs_eager_cl", ">=", 3.0),
        ("rel err <= 1e-5 (fp32)", {"dtype": ("fp32",)}, "rel_err", "<=", 1e-5),
        ("bitwise deterministic", {}, "deterministic_bitwise", "==", True),
    ],
}
COMPARE = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def matches(row: dict, where: dict) -> bool:
    return all(row[k] in v if isinstance(v, tuple) else row[k] == v for k, v in where.items())


def config_label(r: dict) -> str:
    return f"N{r['N']} C{r['C']} {r['H']}x{r['W']} {r['dtype']}"


def row_label(r: dict) -> str:
    return f"{r['case']} {config_label(r)}{' graph' if r['graph'] else ''}"


def evaluate_checks(rows: list[dict], device_type: str) -> list[dict]:
    """PASS / FAIL / SKIP (no matching timed rows) per target and fused impl, with the worst row."""
    out = []
    fused = [name for name in dict.fromkeys(r["impl"] for r in rows) if IMPLS[name].kind == "fused"]
    for impl, (label, where, field, op, threshold) in itertools.product(fused, CHECKS[device_type]):
        sel = [r for r in rows if r["impl"] == impl and r["status"] == "ok" and matches(r, where)
               and r[field] is not None]
        passed = [COMPARE[op](r[field], threshold) for r in sel]
        worst = None
        if sel:
            key = (lambda r: r[field]) if op == "<=" else (lambda r: -r[field])
            worst = max(sel, key=key) if op != "==" else next((r for r, ok in zip(sel, passed) if not ok), sel[0])
        out.append({"check": label, "impl": impl, "status": "SKIP" if not sel else "PASS" if all(passed) else "FAIL",
                    "rows": len(sel), "worst": None if worst is None else worst[field],
                    "worst_at": None if worst is None else row_label(worst)})
    return out


def fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def md_row(r: dict) -> str:
    peak_mb = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
    cells = [r["case"], config_label(r), r["impl"], r["backend"], r["layout"], fmt(r["graph"]),
             f"{fmt(r['median_ms'])} ({fmt(r['p20_ms'])}-{fmt(r['p80_ms'])})", fmt(r["predicted_ms"]),
             fmt(r["gbps"], ".1f"),
             fmt(r["pct_copy_bw"], ".1f"), *(fmt(r[f"speedup_vs_{b}"], ".2f") for b in BASELINES),
             fmt(r["rel_err"], ".1e"), fmt(r["deterministic_bitwise"]), fmt(r["launches"], "d"), fmt(peak_mb, ".1f")]
    return "| " + " | ".join(cells) + " |\n"


def markdown(rows: list[dict], env: dict, checks: list[dict]) -> str:
    columns = ["case", "config", "impl", "backend", "layout", "graph", "median ms (p20-p80)", "model ms", "GB/s",
               "% copy BW",
               "x eager NCHW", "x eager CL", "x compile", "rel err", "same bits", "launches", "peak MB"]
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n"
    body = "".join(md_row(r) for r in rows if r["status"] == "ok")
    not_timed = "".join(f"- {r['status']}: {r['impl']} {row_label(r)}: {r['error']}\n"
                        for r in rows if r["status"] != "ok")
    check_lines = "".join(
        f"- **{c['status']}** {c['impl']}: {c['check']}"
        + (f" (worst {fmt(c['worst'])} at {c['worst_at']}; {c['rows']} rows)" if c["rows"] else " (no rows)") + "\n"
        for c in checks)
    meta = ", ".join(f"{k} {v}" for k, v in env.items() if k != "copy_bw_gbps")
    return (f"{head}{body}\nSpeedups are against the baselines' non-graph rows of the same case and config. "
            f"Copy bandwidth (read+write) {env['copy_bw_gbps']:.1f} GB/s; model ms = the modelled bytes (3P "
            f"forward, 6P forward+backward) at that bandwidth.\n\n{meta}\n"
            + (f"\nNot timed:\n\n{not_timed}" if not_timed else "") + f"\nTargets:\n\n{check_lines}")


def plot(rows: list[dict], path: Path) -> None:
    """Speedup over eager NCHW per config, one panel per case, one bar per impl (and graph replay)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    ok = [r for r in rows if r["status"] == "ok"]
    cases = [c for c, _ in CASES if any(r["case"] == c for r in ok)] or ["fwd"]
    series = list(dict.fromkeys((r["impl"], r["graph"]) for r in ok))  # one colour per series in every panel
    labels = [impl + (" (graph)" if graph else "") for impl, graph in series]
    configs = list(dict.fromkeys(config_label(r).replace(" ", "\n", 1) for r in ok))
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(len(cases), 1, squeeze=False, layout="constrained",
                             figsize=(min(30.0, max(7.0, 3.0 + 0.3 * len(configs) * len(series))), 3.4 * len(cases)))
    for ax, case in zip(axes[:, 0], cases):
        for k, (impl, graph) in enumerate(series):
            values = {config_label(r).replace(" ", "\n", 1): r["speedup_vs_eager_nchw"] for r in ok
                      if r["case"] == case and r["impl"] == impl and r["graph"] == graph}
            if values:
                heights = [values.get(c) or math.nan for c in configs]
                bars = ax.bar([i + k * width for i in range(len(configs))], heights, width, color=f"C{k}")
                ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(configs))], configs, fontsize=7)
        ax.set_xlim(-0.5, len(configs) - 0.1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{case}: x eager NCHW")
        ax.axhline(1.0, color="k", lw=0.5)
    fig.legend(handles=[Patch(color=f"C{k}", label=label) for k, label in enumerate(labels)], fontsize=7,
               loc="outside right upper")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], env: dict, args, device: torch.device, plot_png: bool = True) -> Path:
    """Write ``<out>/ppm_<device-slug>_<date>.json``, ``.md`` (and ``.png``); returns the path stem."""
    checks = evaluate_checks(rows, "cuda" if device.type == "cuda" else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ppm_{device_slug(device)}_{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "checks": checks}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, env, checks))
    if plot_png:
        plot(rows, stem.with_suffix(".png"))
    return stem


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="N values (default: cuda 1 8 16, cpu 2)")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--size", type=int, nargs="+", help="H=W values (default: cuda 60 90, cpu 60)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", help="default: cuda fp32 fp16 bf16, cpu fp32")
    parser.add_argument("--impls", choices=list(IMPLS), nargs="+", help="default: every impl of the device")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--reps", type=int, default=3, help="calls per round (CPU); CUDA: do_bench rep = 20*reps ms")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--compile-mode", help="torch.compile mode (default: max-autotune on CUDA, default on CPU)")
    parser.add_argument("--copy-mib", type=int, help="copy-bandwidth buffer in MiB (default: 2048 CUDA, 1024 CPU)")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args(argv)
    if args.compile_mode is None and torch.device(args.device).type == "cuda":
        args.compile_mode = "max-autotune"
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    rows, env = run(args)
    stem = write_results(rows, env, args, torch.device(args.device))
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json/.md/.png")
    return stem


if __name__ == "__main__":
    main()
