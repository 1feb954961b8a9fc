"""PPM benchmark: fused ops vs eager semseg PPM (NCHW, channels_last) vs torch.compile, interleaved.

    python bench/ppm_bench.py [--device cpu|cuda] [--batch 2] [--channels 2048] [--size 60] \
        [--dtype fp32|fp16|bf16] [--rounds 5] [--reps 3] [--no-compile] [--out bench/results]

Every implementation runs the same module weights on the same input, forward (eval, no grad) and
forward+backward (train mode, backward of a fixed random gradient), in interleaved rounds in one process.
Per row: median time and p20/p80 over rounds, the modelled minimum bytes (fwd: read x + write the
concat = 3P, fwd+bwd 6P, P = bytes of x), GB/s and % of the copy bandwidth measured in the same run,
speedup over eager NCHW and over torch.compile, relative error vs an fp64 reference, and whether two
runs gave the same bits. Writes ``<out>/ppm_<device>_<date>.json`` and ``.md`` and a speedup plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copy_bandwidth_gbps, environment, interleaved  # noqa: E402

import psp_kernels  # noqa: E402
from psp_kernels.reference import SemsegPPM  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(args, device, dtype):
    """Modules with one set of random weights and BN statistics: eager, eager CL, compile, fused, fp64."""
    torch.manual_seed(0)
    red = args.channels // 4
    ref = SemsegPPM(args.channels, red, (1, 2, 3, 6))
    with torch.no_grad():
        for f in ref.features:
            f[2].weight.uniform_(0.5, 1.5), f[2].bias.uniform_(-0.5, 0.5)
            f[2].running_mean.uniform_(-0.1, 0.1), f[2].running_var.uniform_(0.5, 2.0)
    state = ref.state_dict()
    eager = SemsegPPM(args.channels, red, (1, 2, 3, 6)).to(device, dtype)
    eager.load_state_dict(state)
    eager_cl = SemsegPPM(args.channels, red, (1, 2, 3, 6)).to(device, dtype).to(memory_format=torch.channels_last)
    eager_cl.load_state_dict(state)
    fused = psp_kernels.PyramidPooling(args.channels, red).to(device, dtype)
    fused.load_state_dict(state)
    oracle = ref.to(device, torch.float64)
    impls = {"eager_nchw": (eager, False), "eager_cl": (eager_cl, True), "fused": (fused, False)}
    if not args.no_compile:
        comp = SemsegPPM(args.channels, red, (1, 2, 3, 6)).to(device, dtype)
        comp.load_state_dict(state)
        mode = "max-autotune" if device.type == "cuda" else None
        impls["compile"] = (torch.compile(comp, mode=mode), False)
    return impls, oracle


def runners(impls, x, g, train):
    """Zero-argument closures per impl: eval forward, or train forward + backward of g."""
    def make(module, channels_last):
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        module.train(train)
        if not train:
            return lambda: module(xi)
        xg = xi.detach().requires_grad_()

        def step():
            xg.grad = None
            for p in module.parameters():
                p.grad = None
            module(xg).backward(g)
            return xg.grad
        return step
    return {name: make(m, cl) for name, (m, cl) in impls.items()}


def drop_failing(fns, train):
    """Run every impl once; remove (and report) those that raise, e.g. a torch.compile backend error."""
    failures = {}
    for name, fn in list(fns.items()):
        try:
            with torch.no_grad() if not train else torch.enable_grad():
                fn()
        except Exception as err:  # noqa: BLE001 - a failing baseline is a result, not a crash
            failures[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
            del fns[name]
    return failures


def check(fns, oracle, x, g, train):
    """Relative error vs the fp64 oracle and bitwise determinism of two runs, per impl."""
    oracle.train(train)
    x64 = x.double().requires_grad_()
    ref = oracle(x64)
    if train:
        ref.backward(g.double())
        ref = x64.grad
    out = {}
    for name, fn in fns.items():
        with torch.no_grad() if not train else torch.enable_grad():
            a, b = fn().detach().clone(), fn().detach().clone()
        err = ((a.double() - ref).norm() / ref.norm()).item()
        out[name] = {"rel_err": err, "deterministic_bitwise": bool(torch.equal(a, b))}
    return out


def run(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls, oracle = build(args, device, dtype)
    n, c, s = args.batch, args.channels, args.size
    x = torch.randn(n, c, s, s, device=device, dtype=dtype)
    g = torch.randn(n, c + 4 * (c // 4), s, s, device=device, dtype=dtype)
    p_bytes = x.numel() * x.element_size()
    copy_bw = copy_bandwidth_gbps(device)
    rows, failures = [], {}
    for mode, train in (("fwd", False), ("fwd+bwd", True)):
        fns = runners(impls, x, g, train)
        failures.update({f"{name} {mode}": why for name, why in drop_failing(fns, train).items()})
        quality = check(fns, oracle, x, g, train)
        with torch.no_grad() if not train else torch.enable_grad():
            times = interleaved(fns, device, args.rounds, args.reps)
        model_bytes = (3 if mode == "fwd" else 6) * p_bytes
        for name, t in times.items():
            gbps = model_bytes / (t["median_ms"] * 1e-3) / 1e9
            row = {"suite": "ppm", "case": mode, "impl": name, "N": n, "C": c, "H": s, "W": s, "dtype": args.dtype,
                   **t, "model_bytes": model_bytes, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_bw,
                   "copy_bw_gbps": copy_bw, **quality[name],
                   "speedup_vs_eager": times["eager_nchw"]["median_ms"] / t["median_ms"]}
            if "compile" in times:  # absent when compile failed for this mode
                row["speedup_vs_compile"] = times["compile"]["median_ms"] / t["median_ms"]
            rows.append(row)
    env = environment(device)
    env["failed"] = failures
    return rows, env


def markdown(rows, env):
    head = ("| case | impl | median ms (p20-p80) | GB/s | % copy BW | x eager | x compile | rel err | same bits |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['case']} N{r['N']} C{r['C']} {r['H']}x{r['W']} {r['dtype']} | {r['impl']} | "
        f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | {r['gbps']:.1f} | {r['pct_copy_bw']:.1f} | "
        f"{r['speedup_vs_eager']:.2f} | {r.get('speedup_vs_compile', float('nan')):.2f} | {r['rel_err']:.1e} | "
        f"{'yes' if r['deterministic_bitwise'] else 'no'} |\n" for r in rows)
    meta = ", ".join(f"{k} {v}" for k, v in env.items() if k != "failed")
    failed = "".join(f"\nFailed, not timed: {name}: {why}" for name, why in env["failed"].items())
    return f"{head}{body}\nCopy bandwidth (read+write) {rows[0]['copy_bw_gbps']:.1f} GB/s. {meta}\n{failed}\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted({r["case"] for r in rows})
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = [next((r["speedup_vs_eager"] for r in rows if r["case"] == c and r["impl"] == impl), 0.0)
                  for c in cases]  # 0: that impl failed for the case (listed in the .md)
        ax.bar([i + k * width for i in range(len(cases))], values, width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))], cases)
    ax.set_ylabel("speedup over eager NCHW")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=60)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    rows, env = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ppm_{torch.device(args.device).type}_{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    table = markdown(rows, env)
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
