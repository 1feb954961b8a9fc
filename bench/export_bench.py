"""ONNX export benchmark: PSPNet in ONNX Runtime (fused and unfused export) vs the eager torch model, on CPU.

    python bench/export_bench.py [--cases pspnet50 pspnet18] [--rounds 5] [--reps 1] [--out bench/results]

Cases (:data:`CASES`): PSPNet-50 at N=1, 473x473 and PSPNet-18 at N=1, 360x480, 21 classes, seeded random
weights with every BatchNorm's weight, bias and running statistics random too (the export folds them into the
convs). Variants, interleaved in one process on the same weights and the same float32 NCHW input:

- ``onnx_fused``: ONNX Runtime (``pspnet.onnx_runtime.open_session``: CPU, as many intra-op threads as torch)
  on ``pspnet.export.to_onnx`` of ``PSPNet(fused=True)`` (dynamic batch, height and width: the fused PPM and the
  concat-free head at bin resolution in standard ONNX ops);
- ``onnx_unfused``: the same for ``PSPNet(fused=False)`` (semseg's PPM and concat head);
- ``eager_fused_fp32``: the torch fused model under ``torch.no_grad()`` (channels_last inside);
- ``eager_bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``, for reference;
- ``eager_unfused_fp32``: the torch unfused model.

Per variant: median (p20-p80) over rounds of each round's median (``timing.interleaved``) and the max relative
error of its logits vs ``eager_unfused_fp32`` (max |diff| / max |ref|, the export's own measure). Per export: the
wall time of ``to_onnx``, which includes its checks (``onnx.checker``, then ONNX Runtime at N=2 at the case's size
and at N=1 at a second size, compared with the eager model), the file size, and FLOPs counted from the graph at
the case's input (:func:`graph_flops`: shapes from one ONNX Runtime run; Conv 2 N O Ho Wo (Cin/group) kh kw,
MatMul 2 prod(output) K): the head conv (:func:`head_convs`: the undilated 3x3 Conv reading >= C channels, C the
backbone's 2048 / 512 feature channels: semseg's concat conv over 2C, or the concat-free head's x-half conv over C)
and every MatMul (fused graph: the head's branch term at bin resolution, the pooling and the reductions; unfused
graph: the pooling).
Targets (:data:`TARGETS`): eager_fused_fp32 / onnx_fused >= 1.0; fused / unfused (head conv + MatMul) FLOPs
about 0.5. The default run takes a few minutes on 2 cores (a PSPNet-50 export about 35 s of it).
Writes ``<out>/export_cpu_<date>.{json,md}`` (``--out-dir`` is the same flag).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from timing import environment, interleaved, write_results  # noqa: E402

from pspnet.export import to_onnx  # noqa: E402
from pspnet.models import PSPNet  # noqa: E402
from pspnet.onnx_runtime import OnnxSegmenter, open_session  # noqa: E402

#: name -> (ResNet depth, N, H, W).
CASES = {"pspnet50": (50, 1, 473, 473), "pspnet18": (18, 1, 360, 480)}
CLASSES = 21
SPEED, FLOPS = "eager_fused_fp32 / onnx_fused", "fused / unfused (head conv + MatMul) FLOPs"
#: target -> (ratio, lowest, highest): met when lowest <= the case's ratio <= highest ("about 0.5": 0.45-0.55).
TARGETS = {f"{SPEED} >= 1.0": (SPEED, 1.0, math.inf), f"{FLOPS} about 0.5 (0.45-0.55)": (FLOPS, 0.45, 0.55)}


def build(layers: int) -> dict[str, PSPNet]:
    """The unfused and fused PSPNet (eval) on the same seeded weights, every BatchNorm's parameters and running
    statistics random in the ranges of bench/conv_bench.py."""
    torch.manual_seed(0)
    unfused = PSPNet(layers=layers, classes=CLASSES, fused=False)
    with torch.no_grad():
        for bn in (m for m in unfused.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    fused = PSPNet(layers=layers, classes=CLASSES, fused=True)
    fused.load_state_dict(unfused.state_dict())
    return {"fused": fused.eval(), "unfused": unfused.eval()}


def graph_flops(path: str | Path, input_shape: tuple[int, ...]) -> list[dict]:
    """FLOPs of every Conv and MatMul node of the ONNX model at ``path`` for a float32 input of ``input_shape``.

    A copy of the model with the inputs and outputs of these nodes as extra graph outputs runs once in ONNX
    Runtime (zeros) for their shapes; initializers' shapes come from the file. Conv: 2 N O Ho Wo (Cin/group) kh kw
    (the weight is [O, Cin/group, kh, kw]); MatMul: 2 prod(output shape) K, K the first input's last dim.
    Returns one dict per node in graph order: ``node``, ``op``, ``flops``; Conv also ``cin``, ``kernel``,
    ``dilation``."""
    model = onnx.load(path)
    graph = model.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    nodes = [node for node in graph.node if node.op_type in ("Conv", "MatMul")]
    probe = sorted({name for node in nodes for name in (*node.input, *node.output) if name and name not in shapes})
    outputs = {o.name for o in graph.output}
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in probe if name not in outputs)  # type inferred
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "probe.onnx")
        session = open_session(Path(tmp) / "probe.onnx")
        values = session.run(probe, {session.get_inputs()[0].name: np.zeros(input_shape, np.float32)})
    shapes.update((name, value.shape) for name, value in zip(probe, values))
    del values
    records = []
    for node in nodes:
        x, y = shapes[node.input[0]], shapes[node.output[0]]
        if node.op_type == "MatMul":
            records.append({"node": node.name, "op": "MatMul", "flops": 2 * math.prod(y) * x[-1]})
            continue
        w = shapes[node.input[1]]
        dilation = next((list(a.ints) for a in node.attribute if a.name == "dilations"), [1] * (len(w) - 2))
        records.append({"node": node.name, "op": "Conv", "flops": 2 * math.prod(y) * math.prod(w[1:]), "cin": x[1],
                        "kernel": list(w[2:]), "dilation": dilation})
    return records


def head_convs(records: list[dict], channels: int) -> list[dict]:
    """The head's 3x3 conv among :func:`graph_flops`'s records: every undilated 3x3 Conv reading >= ``channels``
    (the backbone's feature channels) input channels. The backbone's 3x3 convs that wide (PSPNet-18's layer4,
    512 -> 512) are dilated, so they are not counted."""
    return [r for r in records if r["op"] == "Conv" and r["kernel"] == [3, 3] and r["dilation"] == [1, 1]
            and r["cin"] >= channels]


def flop_summary(records: list[dict], channels: int) -> dict:
    """Head conv, MatMul and all-Conv GFLOPs of one graph, with the head conv's input channels."""
    head = head_convs(records, channels)
    matmuls = [r for r in records if r["op"] == "MatMul"]
    return {"head_conv_gflops": sum(r["flops"] for r in head) / 1e9, "head_conv_cin": [r["cin"] for r in head],
            "matmul_gflops": sum(r["flops"] for r in matmuls) / 1e9, "matmuls": len(matmuls),
            "conv_gflops": sum(r["flops"] for r in records if r["op"] == "Conv") / 1e9}


def export(net: PSPNet, path: Path, n: int, h: int, w: int) -> dict:
    """``to_onnx`` of ``net`` (dynamic; example size h x w) timed, its file size and its graph's FLOPs."""
    verified: list[str] = []
    start = time.perf_counter()
    to_onnx(net, path, (h, w), dynamic=True, report=verified.append)
    return {"export_s": time.perf_counter() - start, "file_mib": path.stat().st_size / 2 ** 20, "verified": verified,
            **flop_summary(graph_flops(path, (n, 3, h, w)), net.fea_dim)}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


def bench_case(case: str, args) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Timing rows, export rows and the ratios of one case."""
    layers, n, h, w = CASES[case]
    nets = build(layers)
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        exports, sessions = {}, {}
        for kind, net in nets.items():
            path = Path(tmp) / f"{case}_{kind}.onnx"
            exports[kind] = dict(case=case, export=f"onnx_{kind}", **export(net, path, n, h, w))
            sessions[kind] = OnnxSegmenter(open_session(path, threads=torch.get_num_threads()))

    def eager(net, bf16=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x)
    fns = {"onnx_fused": lambda: sessions["fused"](x), "onnx_unfused": lambda: sessions["unfused"](x),
           "eager_fused_fp32": lambda: eager(nets["fused"]), "eager_bf16": lambda: eager(nets["fused"], True),
           "eager_unfused_fp32": lambda: eager(nets["unfused"])}
    ref = fns["eager_unfused_fp32"]()
    errs = {name: rel_err(fn(), ref) for name, fn in fns.items()}
    times = interleaved(fns, torch.device("cpu"), args.rounds, args.reps)
    fused_ms = times["onnx_fused"]["median_ms"]
    rows = [dict(case=case, variant=name, layers=layers, N=n, H=h, W=w, **t, vs_onnx_fused=t["median_ms"] / fused_ms,
                 rel_err=errs[name]) for name, t in times.items()]
    head_and_matmul = {k: e["head_conv_gflops"] + e["matmul_gflops"] for k, e in exports.items()}
    ratios = {SPEED: times["eager_fused_fp32"]["median_ms"] / fused_ms,
              "onnx_unfused / onnx_fused": times["onnx_unfused"]["median_ms"] / fused_ms,
              FLOPS: head_and_matmul["fused"] / head_and_matmul["unfused"]}
    return rows, list(exports.values()), ratios


def check_targets(ratios: dict[str, dict[str, float]]) -> list[dict]:
    """Each of :data:`TARGETS` per case (``ratios``: case -> its ratios), met or not."""
    return [dict(case=case, target=name, value=r[key], met=lo <= r[key] <= hi)
            for case, r in ratios.items() for name, (key, lo, hi) in TARGETS.items()]


def markdown(rows: list[dict], exports: list[dict], ratios: dict, targets: list[dict], env: dict, command: str,
             args) -> str:
    lines = [f"Inference, fp32 NCHW input: median (p20-p80) of {args.rounds} interleaved rounds' medians of "
             f"{args.reps} call(s)", "",
             "| case | config | variant | median ms (p20-p80) | / onnx_fused | rel err vs eager_unfused_fp32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | N{r['N']} {r['H']}x{r['W']} | {r['variant']} | {r['median_ms']:.1f} "
                     f"({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | {r['vs_onnx_fused']:.2f} | {r['rel_err']:.1e} |")
    lines += ["", "Exports (dynamic batch, H, W; export s: wall time of to_onnx, its verification in ONNX Runtime "
              "included; GFLOPs counted from the graph at the case's input):", "",
              "| case | export | export s | MiB | head conv GFLOPs (Cin) | MatMul GFLOPs (nodes) | all Conv GFLOPs |",
              "|---|---|---|---|---|---|---|"]
    for e in exports:
        lines.append(f"| {e['case']} | {e['export']} | {e['export_s']:.1f} | {e['file_mib']:.1f} | "
                     f"{e['head_conv_gflops']:.2f} ({', '.join(map(str, e['head_conv_cin']))}) | "
                     f"{e['matmul_gflops']:.3f} ({e['matmuls']}) | {e['conv_gflops']:.2f} |")
    lines += ["", "Ratios and targets:", ""]
    lines += [f"- {case}: {name} = {value:.3f}" for case, r in ratios.items() for name, value in r.items()]
    lines += [f"- **{'met' if t['met'] else 'not met'}** {t['case']}: {t['target']} ({t['value']:.3f})"
              for t in targets]
    lines += ["", f"command: `{command}`", "", ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1, help="calls per round")
    p.add_argument("--out", "--out-dir", dest="out", default=str(BENCH / "results"))
    return p.parse_args(argv)


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rows, exports, ratios = [], [], {}
    for case in args.cases:
        case_rows, case_exports, ratios[case] = bench_case(case, args)
        rows += case_rows
        exports += case_exports
    targets = check_targets(ratios)
    device = torch.device("cpu")
    env = dict(environment(device), onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
               onnxscript=onnxscript.__version__, ort_threads=torch.get_num_threads())
    command = shlex.join(["python", "bench/export_bench.py", *argv])
    payload = {"env": env, "command": command, "rows": rows, "exports": exports, "ratios": ratios, "targets": targets}
    return write_results(args.out, "export", device, payload,
                         markdown(rows, exports, ratios, targets, env, command, args))


if __name__ == "__main__":
    main()
