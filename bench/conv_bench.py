"""Backbone conv benchmark: fused conv + BN + ReLU (+ residual) vs eager and torch.compile, and PSPNet-50 inference.

    python bench/conv_bench.py [--device cpu|cuda] [--batch N ...] [--size H ...] [--dtype fp32|bf16 ...]
        [--rounds 5] [--reps 3] [--no-compile] [--no-model] [--model-size 233 ...] [--model-batch 1 ...]
        [--out bench/results]

Layer rows (channels_last): the convs of PSPNet-50's dilated blocks, i.e.
layer3 (1x1 1024->256, 3x3 256->256 dilation 2, 1x1 256->1024 + shortcut) and layer4 (1x1 2048->512, 3x3
512->512 dilation 4, 1x1 512->2048 + shortcut), interleaved in one process on the same weights:

- ``eager``: ``relu(bn(conv(x)) [+ residual])`` as separate ops (cuDNN / oneDNN conv, then BN, add, ReLU);
- ``compile``: ``torch.compile`` of that (mode max-autotune on CUDA; default mode on CPU);
- ``fused``: ``psp_kernels.nn.conv.fused_conv_bn`` (BN folded into the conv, one op with the bias, residual and
  ReLU epilogue): the kernel table's default (``psp_kernels.dispatch``: on CUDA eager cuDNN in x's dtype),
  and on CUDA each fused kernel alone, ``fused_triton`` and ``fused_cuda`` (CUTLASS); on CPU oneDNN's conv
  with the epilogue in place (the C++ kernel).

in eval mode ("eval"), and in training mode ("train fwd": BatchNorm with batch statistics and the running
statistics update; eager modules vs ``psp_kernels.ops.training_conv``, whose statistics come from the
conv's epilogue on CUDA; on CPU it runs the reference path).

Per row: median (p20-p80) over rounds, TFLOP/s of the conv (2 N Ho Wo O C k^2), % of the matmul peak measured
in the same run (bf16 8192^3 on CUDA, fp32 2048^3 on CPU), speedups, normwise error vs an fp64 reference.
Model rows: a PSPNet-50 training step (N=8 at 473, bf16 autocast; on CUDA, or with ``--train-step``), and
PSPNet-50 eval forward, ``fused=True`` (backbone folded, fused PPM, concat-free head) vs
``fused=False`` vs ``torch.compile`` of the latter (CUDA; on CPU with ``--model-compile``), at each
``--model-batch`` x ``--model-size``^2, per ``--model-precision`` (fp32; bf16_autocast: fp32 weights under
``torch.autocast(bfloat16)``, what ``amp: bf16`` runs; bf16: the model cast to bf16) and ``--model-layout``
(nchw, channels_last). On CPU the markdown ends with the PASS / FAIL lines of :data:`MODEL_TARGETS`.
Defaults: CPU N=1, 30x30 (the 233 crop's output stride 8), fp32, model N=1 at 233 in fp32 and bf16 autocast,
NCHW and channels_last; CUDA N=8/16, 60x60 / 90x90, bf16 and fp32, model N=1/16 at 473 and 713 in bf16,
channels_last.
Writes ``<out>/conv_<device>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from timing import environment, interleaved, round_median_ms, write_results  # noqa: E402

import psp_kernels  # noqa: E402
from psp_kernels.nn.conv import fused_conv_bn  # noqa: E402
from psp_kernels.ops import training_conv  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: (name, C, O, kernel, dilation, residual): PSPNet-50's layer3 / layer4 block convs (stride 1, output stride 8).
LAYERS = [("layer3.conv1 1x1", 1024, 256, 1, 1, False), ("layer3.conv2 3x3 d2", 256, 256, 3, 2, False),
          ("layer3.conv3 1x1 +res", 256, 1024, 1, 1, True), ("layer4.conv1 1x1", 2048, 512, 1, 1, False),
          ("layer4.conv2 3x3 d4", 512, 512, 3, 4, False), ("layer4.conv3 1x1 +res", 512, 2048, 1, 1, True)]


def matmul_peak_tflops(device: torch.device) -> float:
    """Measured dense matmul throughput: bf16 8192^3 on CUDA, fp32 2048^3 on CPU (random data)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = round_median_ms(lambda: a @ b, device, 5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


class ConvBNReLU(nn.Module):
    """The eager baseline: conv, BatchNorm (eval), optional residual add, ReLU as separate ops."""

    def __init__(self, c: int, o: int, k: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(c, o, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(o)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5), self.bn.bias.uniform_(-0.2, 0.2)
            self.bn.running_mean.uniform_(-0.2, 0.2), self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        return F.relu(y if residual is None else y + residual)


def bench_layer(spec, n: int, size: int, dtype_name: str, device, args, peak: float) -> list[dict]:
    name, c, o, k, dilation, has_res = spec
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    module = ConvBNReLU(c, o, k, dilation).to(device).eval()
    ref_module = ConvBNReLU(c, o, k, dilation).double().to(device).eval()
    ref_module.load_state_dict(module.state_dict())
    module = module.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(n, c, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    res = torch.randn(n, o, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) \
        if has_res else None
    with torch.no_grad():
        ref = ref_module(x.double(), None if res is None else res.double())
    fns = {"eager": lambda: module(x, res), "fused": lambda: fused_conv_bn(x, module.conv, module.bn, residual=res)}
    if device.type == "cuda":  # each fused CUDA kernel on its own (fused = the table's default)
        for backend in ("triton", "cuda"):
            fns[f"fused_{backend}"] = lambda b=backend: _with_backend(b, lambda: fused_conv_bn(
                x, module.conv, module.bn, residual=res))
    if not args.no_compile:
        compiled = torch.compile(module, mode="max-autotune" if device.type == "cuda" else None)
        fns["compile"] = lambda: compiled(x, res)
    rows = _layer_rows(spec, "eval", fns, ref, n, size, dtype_name, device, args, peak)
    rows += bench_layer_train(spec, module, x, res, n, size, dtype_name, device, args, peak)
    return rows


def _with_backend(name: str, fn):
    with psp_kernels.use_backend(name, "cuda"):
        return fn()


def bench_layer_train(spec, module, x, res, n, size, dtype_name, device, args, peak) -> list[dict]:
    """Training forward: conv -> BatchNorm (batch statistics, running-statistics update) -> (+res) -> ReLU,
    eager modules vs the fused training op (statistics from the conv's epilogue, one BN + ReLU pass)."""
    module.train()
    conv, bn = module.conv, module.bn
    with torch.no_grad():
        ref = F.relu(F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, 1, conv.padding, conv.dilation),
                                  None, None, bn.weight.double(), bn.bias.double(), training=True)
                     + (0 if res is None else res.double()))
    fns = {"eager": lambda: module(x, res),
           "fused": lambda: training_conv(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                          res, 1, conv.padding[0], conv.dilation[0], True)}
    rows = _layer_rows(spec, "train fwd", fns, ref, n, size, dtype_name, device, args, peak)
    module.eval()
    return rows


def _layer_rows(spec, mode, fns, ref, n, size, dtype_name, device, args, peak) -> list[dict]:
    name, c, o, k, dilation, _ = spec
    rows, outs = [], {}
    with torch.no_grad():
        for impl, fn in list(fns.items()):
            try:
                outs[impl] = fn()
            except Exception as e:  # a failing baseline is reported, the others go on
                rows.append(dict(case=name, mode=mode, impl=impl, status="error",
                                 error=f"{type(e).__name__}: {e}"[:300]))
                del fns[impl]
        times = interleaved(fns, device, args.rounds, args.reps)
    flops = 2 * n * size * size * o * c * k * k
    base = {"case": name, "mode": mode, "N": n, "C": c, "O": o, "H": size, "W": size, "k": k, "dilation": dilation,
            "dtype": dtype_name, "layout": "channels_last", "status": "ok"}
    for impl, t in times.items():
        tflops = flops / (t["median_ms"] * 1e-3) / 1e12
        out = outs[impl].double()
        rows.append(dict(base, impl=impl, **t, tflops=tflops, pct_matmul_peak=100 * tflops / peak,
                         rel_err=((out - ref).norm() / ref.norm()).item()))
    for r in rows:
        if r["status"] == "ok":
            for b in ("eager", "compile"):
                if b in times:
                    r[f"speedup_vs_{b}"] = times[b]["median_ms"] / r["median_ms"]
    return rows


#: PSPNet-50 eval precisions: name -> (parameter and input dtype, autocast dtype or None).
MODEL_PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
                    "bf16_autocast": (torch.float32, torch.bfloat16)}
MODEL_LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
#: CPU targets of the PSPNet-50 eval rows (fused vs eager, same precision and layout): issue 14.
MODEL_TARGETS = {("fp32", "nchw"): 1.3, ("fp32", "channels_last"): 1.3, ("bf16_autocast", "channels_last"): 1.3}


def bench_model(device, args) -> list[dict]:
    """PSPNet-50 eval forward, fused=True vs fused=False vs torch.compile of the latter, same weights, per
    precision (``--model-precision``: fp32, bf16 autocast on fp32 weights, or the model cast to bf16) and
    layout (``--model-layout``). Defaults: CPU fp32 and bf16 autocast, NCHW and channels_last; CUDA the bf16
    model, channels_last."""
    from pspnet.models import PSPNet
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = {"pspnet50_fused": PSPNet(layers=50, classes=150, fused=True),
            "pspnet50_eager": PSPNet(layers=50, classes=150, fused=False)}
    base["pspnet50_fused"].load_state_dict(base["pspnet50_eager"].state_dict())
    ref_net = None
    if not cuda:  # the fp64 reference (on CUDA, fp64 PSPNet-50 is too slow to be worth it)
        ref_net = PSPNet(layers=50, classes=150, fused=False).double().eval()
        ref_net.load_state_dict(base["pspnet50_eager"].state_dict())
    rows = []
    for precision in args.model_precision or (["bf16"] if cuda else ["fp32", "bf16_autocast"]):
        dtype, amp = MODEL_PRECISIONS[precision]
        for layout in args.model_layout or (["channels_last"] if cuda else ["nchw", "channels_last"]):
            fmt = MODEL_LAYOUTS[layout]
            nets = {k: m.to(device=device, dtype=dtype, memory_format=fmt).eval() for k, m in base.items()}
            calls = dict(nets)
            if not args.no_compile and (cuda or args.model_compile):
                torch._dynamo.reset()
                calls["pspnet50_compile"] = torch.compile(nets["pspnet50_eager"], mode="max-autotune" if cuda else None)
            for n in args.model_batch or ([1, 16] if cuda else [1]):
                for size in args.model_size or ([473, 713] if cuda else [233]):
                    x = torch.randn(n, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    rows += _time_models(calls, x, amp, ref_net, device, args, precision, layout)
    return rows


def _time_models(calls, x, amp, ref_net, device, args, precision, layout) -> list[dict]:
    def run(m):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return m(x)
    failed = {}
    for k in list(calls):
        try:
            run(calls[k])
        except Exception as err:  # noqa: BLE001 - a failing baseline (torch.compile) is a result, not a crash
            failed[k] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            del calls[k]
    with torch.no_grad():
        ref = ref_net(x.double()) if ref_net is not None else None
    times = interleaved({k: (lambda m=m: run(m)) for k, m in calls.items()}, device, args.rounds, 1)
    errs = {k: None if ref is None else ((run(m).double() - ref).norm() / ref.norm()).item() for k, m in calls.items()}
    n, _, h, w = x.shape
    rows = _model_rows("PSPNet-50 eval forward", times, n, h, precision, errs, layout)
    return rows + [dict(case="PSPNet-50 eval forward", impl=k, status="failed", error=e, N=n, H=h, W=w,
                        dtype=precision, layout=layout) for k, e in failed.items()]


def _model_rows(case, times, n, size, dtype, errs=None, layout="channels_last") -> list[dict]:
    rows = []
    for k, t in times.items():
        speed = {f"speedup_vs_{b}": times[f"pspnet50_{b}"]["median_ms"] / t["median_ms"]
                 for b in ("eager", "compile") if f"pspnet50_{b}" in times}
        rows.append(dict(case=case, impl=k, status="ok", N=n, H=size, W=size, dtype=str(dtype).replace("torch.", ""),
                         layout=layout, **t, rel_err=(errs or {}).get(k), **speed))
    return rows


def model_checks(rows: list[dict]) -> list[str]:
    """PASS / FAIL lines of :data:`MODEL_TARGETS` (CPU): the fused model vs eager in the same precision and
    layout, worst row over the batch sizes and input sizes."""
    lines = []
    for (precision, layout), target in MODEL_TARGETS.items():
        sel = [r["speedup_vs_eager"] for r in rows if r["case"] == "PSPNet-50 eval forward" and r["status"] == "ok"
               and r["impl"] == "pspnet50_fused" and r["dtype"] == precision and r["layout"] == layout]
        status = "SKIP" if not sel else "PASS" if min(sel) >= target else "FAIL"
        worst = f" (worst {min(sel):.2f}x)" if sel else ""
        lines.append(f"- **{status}** PSPNet-50 eval fused >= {target}x eager, {precision} {layout}{worst}")
    return lines


def bench_train_step(device, args) -> list[dict]:
    """PSPNet-50 SGD training step (bf16 autocast on CUDA, channels_last), fused=True (fused backbone convs, PPM,
    head) vs fused=False vs torch.compile of the latter, same weights and batch."""
    from pspnet.models import PSPNet
    torch.manual_seed(0)
    nets = {"pspnet50_fused": PSPNet(layers=50, classes=150, fused=True),
            "pspnet50_eager": PSPNet(layers=50, classes=150, fused=False)}
    nets["pspnet50_fused"].load_state_dict(nets["pspnet50_eager"].state_dict())
    nets = {k: m.to(device=device, memory_format=torch.channels_last).train() for k, m in nets.items()}
    calls = dict(nets)
    if not args.no_compile and device.type == "cuda":
        calls["pspnet50_compile"] = torch.compile(nets["pspnet50_eager"], mode="max-autotune-no-cudagraphs")
    n, size = args.step_batch, args.step_size
    x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (n, size, size), device=device)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}
    opts["pspnet50_compile"] = opts["pspnet50_eager"]
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(k):
        def run():
            opts[k].zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                _, main, aux = calls[k](x, y)
                loss = main + 0.4 * aux
            loss.backward()
            opts[k].step()
        return run
    times = interleaved({k: step(k) for k in calls}, device, args.rounds, 1)
    return _model_rows("PSPNet-50 train step", times, n, size, amp or torch.float32)


def markdown(rows: list[dict], env: dict, peak: float) -> str:
    lines = [f"matmul peak measured in this run: {peak:.2f} TFLOP/s", "",
             "| case | config | impl | median ms (p20-p80) | TFLOP/s | % peak | x eager | x compile | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} ({r.get('mode', '')}) | | {r['impl']} | {r['status']}: {r.get('error', '')} "
                         "| | | | | |")
            continue

        def f(key, spec=".2f"):
            return "-" if r.get(key) is None else format(r[key], spec)
        cfg = f"N{r['N']} {r['H']}x{r['W']} {r['dtype']}"
        if r["case"].startswith("PSPNet"):
            cfg += f" {r['layout']}"
        case = r["case"] if "mode" not in r else f"{r['case']} ({r['mode']})"
        lines.append(f"| {case} | {cfg} | {r['impl']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})"
                     f" | {f('tflops', '.3f')} | {f('pct_matmul_peak', '.1f')} | {f('speedup_vs_eager')} | "
                     f"{f('speedup_vs_compile')} | {f('rel_err', '.1e')} |")
    if env.get("device_type") == "cpu" and any(r["case"] == "PSPNet-50 eval forward" for r in rows):
        lines += ["", "Targets:", ""] + model_checks(rows)
    lines += ["", ", ".join(f"{k} {v}" for k, v in env.items() if k != "device_type")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--size", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per round (CPU)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer rows")
    p.add_argument("--no-model", action="store_true", help="skip the PSPNet-50 rows")
    p.add_argument("--model-size", type=int, nargs="+")
    p.add_argument("--model-batch", type=int, nargs="+")
    p.add_argument("--model-precision", nargs="+", choices=sorted(MODEL_PRECISIONS),
                   help="default: cpu fp32 bf16_autocast, cuda bf16")
    p.add_argument("--model-layout", nargs="+", choices=sorted(MODEL_LAYOUTS),
                   help="default: cpu nchw channels_last, cuda channels_last")
    p.add_argument("--model-compile", action="store_true",
                   help="also torch.compile the whole model on CPU (minutes of compile; always on CUDA)")
    p.add_argument("--train-step", action="store_true",
                   help="add the PSPNet-50 training-step rows (default on CUDA; on CPU bench/head_bench.py has them)")
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--step-size", type=int, default=473)
    p.add_argument("--out", default=str(BENCH / "results"))
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    peak = matmul_peak_tflops(device)
    rows = []
    if not args.no_layers:
        for n in args.batch or ([8, 16] if cuda else [1]):
            for size in args.size or ([60, 90] if cuda else [30]):
                for dt in args.dtype or (["bf16", "fp32"] if cuda else ["fp32"]):
                    for spec in LAYERS:
                        rows += bench_layer(spec, n, size, dt, device, args, peak)
    if not args.no_model:
        rows += bench_model(device, args)
        if args.train_step or cuda:
            rows += bench_train_step(device, args)
    env = dict(environment(device), matmul_peak_tflops=round(peak, 3))
    return write_results(args.out, "conv", device, {"env": env, "rows": rows},
                         markdown(rows, dict(env, device_type=device.type), peak))


if __name__ == "__main__":
    main()
