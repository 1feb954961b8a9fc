"""PSP head benchmark: concat-free head vs semseg's concat head (eager, torch.compile), and PSPNet-50 steps.

    python bench/head_bench.py [--device cpu|cuda] [--batch N ...] [--channels 2048] [--size H ...]
        [--dtype fp32|bf16 ...] [--rounds 5] [--reps 1] [--no-compile] [--no-model] [--model-size 233 473]
        [--model-batch 2] [--model-amp fp32 bf16] [--out bench/results]

Head = pyramid pooling + 3x3 conv (C + 4R -> 512) + BN + ReLU (semseg's ``ppm`` and ``cls.0``-``cls.2``).
Implementations, interleaved in one process on the same weights and input: ``eager_concat``
(``PSPHead(fused=False)``: semseg's concat head), ``compile_concat`` (``torch.compile`` of it; mode
max-autotune on CUDA) and ``concat_free`` (``PSPHead(fused=True)``). Cases: forward (eval, no grad) and
forward+backward (train mode, backward of a fixed random gradient). Per row: median (p20-p80) over rounds,
FLOPs of the head's 3x3 conv as the design computes it and TFLOP/s, speedups, relative error vs an fp64
reference, and the activation memory: bytes of the tensors autograd saves for backward (distinct
storages, parameters excluded, with and without x itself; CPU and GPU) and, on GPU, ``torch.cuda.max_memory_allocated`` above the inputs.
Whole-model rows: a PSPNet-50 training step (SGD, fused=True vs fused=False, the same weights, channels_last)
at ``--model-batch`` x ``--model-size``^2 (each size; default 233 and semseg's 473 crop), in fp32 and under
bf16 autocast (``--model-amp``).
Defaults: CPU N=2, C=2048, 60x60, fp32; CUDA N=8/16, 60x60 and 90x90, bf16 and fp32.
Writes ``<out>/head_<device>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from timing import environment, interleaved, write_results  # noqa: E402

from psp_kernels import PSPHead  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT_CHANNELS = 512


def head_flops(n: int, c: int, h: int, w: int, concat: bool) -> float:
    """Forward FLOPs of the 3x3 conv: over 2C input channels (concat) or C (concat-free; the branch term's
    channel mix and interpolation at bin resolution add < 0.2 %, not counted)."""
    return 2.0 * n * h * w * OUT_CHANNELS * (2 * c if concat else c) * 9


def saved_bytes(fn, module, x: torch.Tensor) -> dict[str, int]:
    """Activation memory: bytes of the distinct storages autograd saves for backward while ``fn`` runs,
    the module's parameters (views of them included) left out; and the same without x's storage (in a
    whole network the backbone already keeps x, its last ReLU's output, for its own backward)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    total = sum(seen.values())
    return {"saved_bytes": total, "saved_bytes_beyond_x": total - seen.get(x.untyped_storage().data_ptr(), 0)}


def build(c: int, device, dtype, compile_mode: str | None, use_compile: bool):
    torch.manual_seed(0)
    ref = PSPHead(c, c // 4, OUT_CHANNELS, fused=False)
    with torch.no_grad():
        for bn in [f[2] for f in ref.ppm.features] + [ref.cls[1]]:
            bn.running_var.uniform_(0.5, 2.0), bn.running_mean.uniform_(-0.1, 0.1)
    state = ref.state_dict()
    impls = {}
    for name, fused in (("eager_concat", False), ("concat_free", True)):
        m = PSPHead(c, c // 4, OUT_CHANNELS, fused=fused)
        m.load_state_dict(state)
        impls[name] = m.to(device, dtype)
    if use_compile:
        m = PSPHead(c, c // 4, OUT_CHANNELS, fused=False)
        m.load_state_dict(state)
        impls["compile_concat"] = torch.compile(m.to(device, dtype), mode=compile_mode)
    return impls, ref.to(device, torch.float64)


def step_fn(module, x, g, train: bool):
    xi = x.detach().requires_grad_(train)

    def run():
        module.train(train)
        if not train:
            with torch.no_grad():
                return [module(x)]
        xi.grad = None
        for p in module.parameters():
            p.grad = None
        module(xi).backward(g)
        return [xi.grad] + param_grads(module)
    run.x = xi
    return run


def param_grads(module) -> list[torch.Tensor]:
    """Parameter gradients in semseg's layout, by name: a HeadConv's two parts joined into its weight."""
    grads = {name: p.grad for name, p in module.named_parameters()}
    for name in [n for n in grads if n.endswith(".weight_x")]:
        base = name[:-len("_x")]
        grads[base] = torch.cat([grads.pop(name), grads.pop(base + "_branches")], dim=1)
    return [grads[k] for k in sorted(grads)]


def rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(((a.double() - b) ** 2).sum() for a, b in zip(got, ref)) ** 0.5
    den = sum((b ** 2).sum() for b in ref) ** 0.5
    return float(num / den)


def bench_head(n, c, size, dtype_name, device, args) -> list[dict]:
    dtype = DTYPES[dtype_name]
    mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else None)
    impls, oracle = build(c, device, dtype, mode, not args.no_compile)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(n, c, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn(n, OUT_CHANNELS, size, size, device=device, dtype=dtype)
    rows = []
    for case, train in (("fwd", False), ("fwd+bwd", True)):
        ref = step_fn(oracle, x.double(), g.double(), train)()
        fns, extra = {}, {}
        for name, m in impls.items():
            fn = step_fn(m, x, g, train)
            try:
                out = fn()
            except Exception as err:  # noqa: BLE001 - a failing baseline is a result, not a crash
                rows.append(dict(case=case, impl=name, status="failed", error=f"{type(err).__name__}: {err}"[:300]))
                continue
            fns[name] = fn
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                peak = torch.cuda.max_memory_allocated() - base
            extra[name] = dict(rel_err=rel_err(out, ref), peak_mem_bytes=peak,
                               **(saved_bytes(fn, m, fn.x) if train else {}),
                               deterministic_bitwise=all(torch.equal(a, b) for a, b in zip(out, fn())))
        times = interleaved(fns, device, args.rounds, args.reps)
        for name, t in times.items():
            flops = head_flops(n, c, size, size, concat=name != "concat_free") * (3 if train else 1)
            rows.append(dict(case=case, impl=name, status="ok", N=n, C=c, H=size, W=size, dtype=dtype_name, **t,
                             tflops=flops / (t["median_ms"] * 1e-3) / 1e12, flops=flops, **extra[name]))
        for r in rows:
            if r["case"] == case and r["status"] == "ok":
                for base in ("eager_concat", "compile_concat"):
                    if base in times:
                        r[f"speedup_vs_{base}"] = times[base]["median_ms"] / r["median_ms"]
    return rows


def bench_model(device, args) -> list[dict]:
    """PSPNet-50 SGD training step, fused=True (concat-free head, fused PPM) vs fused=False, same weights,
    channels_last, in fp32 and under bf16 autocast (``--model-amp``)."""
    from pspnet.models import PSPNet
    torch.manual_seed(0)
    nets = {}
    for name, fused in (("pspnet50_fused", True), ("pspnet50_reference", False)):
        torch.manual_seed(0)
        nets[name] = PSPNet(layers=50, classes=19, fused=fused).to(device, memory_format=torch.channels_last).train()
    nets["pspnet50_fused"].load_state_dict(nets["pspnet50_reference"].state_dict())
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}
    rows = []
    for amp in args.model_amp:
        for size in args.model_size:
            rows += _model_rows(nets, opts, size, amp, device, args)
    return rows


def _model_rows(nets, opts, size, amp, device, args) -> list[dict]:
    x = torch.randn(args.model_batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 19, (args.model_batch, size, size), device=device)

    def step(name):
        def run():
            opts[name].zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                _, main, aux = nets[name](x, y)
            (main + 0.4 * aux).backward()
            opts[name].step()
        return run
    times = interleaved({k: step(k) for k in nets}, device, args.rounds, 1)
    rows = [dict(case="train step", impl=k, status="ok", N=args.model_batch, H=size, W=size,
                 dtype="bf16 autocast" if amp == "bf16" else "fp32", **t) for k, t in times.items()]
    for r in rows:
        r["speedup_vs_reference"] = times["pspnet50_reference"]["median_ms"] / r["median_ms"]
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["| case | config | impl | median ms (p20-p80) | TFLOP/s | x eager concat | x compile | rel err | "
             "saved MB | saved MB beyond x | peak MB | same bits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | | {r['impl']} | {r['status']}: {r.get('error', '')} | | | | | | | | |")
            continue
        cfg = f"N{r['N']} {r.get('C', '')} {r['H']}x{r['W']} {r['dtype']}"

        def f(key, spec=".2f"):
            return "-" if r.get(key) is None else format(r[key], spec)
        mb = lambda key: "-" if not r.get(key) else f"{r[key] / 1e6:.0f}"  # noqa: E731
        speed = f("speedup_vs_eager_concat") if "speedup_vs_eager_concat" in r else f("speedup_vs_reference")
        lines.append(f"| {r['case']} | {cfg} | {r['impl']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})"
                     f" | {f('tflops', '.3f')} | {speed} | {f('speedup_vs_compile_concat')} | {f('rel_err', '.1e')} | "
                     f"{mb('saved_bytes')} | {mb('saved_bytes_beyond_x')} | {mb('peak_mem_bytes')} | "
                     f"{'-' if 'deterministic_bitwise' not in r else ('yes' if r['deterministic_bitwise'] else 'no')} |")
    lines.append("")
    lines.append(", ".join(f"{k} {v}" for k, v in env.items()))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--size", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1, help="calls per round (CPU)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--no-model", action="store_true", help="skip the PSPNet-50 training-step rows")
    p.add_argument("--model-size", type=int, nargs="+", default=[233, 473])
    p.add_argument("--model-batch", type=int, default=2)
    p.add_argument("--model-amp", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="training-step precision: fp32, or bf16 autocast")
    p.add_argument("--out", default=str(BENCH / "results"))
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batches = args.batch or ([8, 16] if cuda else [2])
    sizes = args.size or ([60, 90] if cuda else [60])
    dtypes = args.dtype or (["bf16", "fp32"] if cuda else ["fp32"])
    rows = []
    for n in batches:
        for size in sizes:
            for dt in dtypes:
                rows += [dict(r, **{"N": n, "H": size, "W": size, "dtype": dt}) if r["status"] != "ok" else r
                         for r in bench_head(n, args.channels, size, dt, device, args)]
    if not args.no_model:
        rows += bench_model(device, args)
    env = environment(device)
    return write_results(args.out, "head", device, {"env": env, "rows": rows}, markdown(rows, env))


if __name__ == "__main__":
    main()
