"""Smoke test of bench/ppm_bench.py on CPU: a tiny shape end to end; JSON rows, markdown and PNG checked. And
bench/export_bench.py's FLOP counter and targets on a tiny exported model (its PSPNet run takes minutes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

N, C, SIZE = 2, 64, 12
P = N * C * SIZE * SIZE * 4  # bytes of x, fp32
TIMED = ("eager_nchw", "eager_cl", "fused_cpp")
FIELDS = {"suite", "case", "impl", "backend", "N", "C", "H", "W", "dtype", "layout", "graph", "status", "error",
          "median_ms", "p20_ms", "p80_ms", "rounds", "model_bytes", "predicted_ms", "gbps", "pct_copy_bw",
          "copy_bw_gbps", "speedup_vs_eager_nchw", "speedup_vs_eager_cl", "speedup_vs_compile", "rel_err", "rel_err_parts",
          "deterministic_bitwise", "launches", "peak_mem_bytes"}
POSITIVE = ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_copy_bw", "copy_bw_gbps", "speedup_vs_eager_nchw",
            "speedup_vs_eager_cl")


@pytest.fixture(scope="module")
def ppm_bench(load_bench):
    return load_bench("ppm_bench")


@pytest.fixture(scope="module")
def results(ppm_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # fused_cuda (the CUDA C++ kernels) has no kernel for CPU tensors: an unavailable row
    stem = ppm_bench.main(["--device", "cpu", "--batch", str(N), "--channels", str(C), "--size", str(SIZE),
                           "--dtype", "fp32", "--rounds", "1", "--reps", "1", "--no-compile", "--copy-mib", "64",
                           "--impls", *TIMED, "fused_cuda", "--out", str(out)])
    return stem, json.loads(stem.with_suffix(".json").read_text())


def test_timed_rows(results):
    _, data = results
    rows = data["rows"]
    assert all(set(r) == FIELDS for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted((r["case"], r["impl"]) for r in ok) == sorted((c, i) for c in ("fwd", "fwd+bwd") for i in TIMED)
    for r in ok:
        assert (r["suite"], r["N"], r["C"], r["H"], r["W"], r["dtype"], r["graph"]) == ("ppm", N, C, SIZE, SIZE,
                                                                                       "fp32", False)
        assert r["layout"] == ("channels_last" if r["impl"] == "eager_cl" else "nchw")
        assert r["backend"] == {"eager_nchw": "aten", "eager_cl": "aten", "fused_cpp": "cpp"}[r["impl"]]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in POSITIVE), r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rounds"] == 1
        assert r["model_bytes"] == (3 if r["case"] == "fwd" else 6) * P
        assert r["gbps"] == pytest.approx(r["model_bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["predicted_ms"] == pytest.approx(r["model_bytes"] / (r["copy_bw_gbps"] * 1e9) * 1e3)
        assert r["predicted_ms"] / r["median_ms"] == pytest.approx(r["pct_copy_bw"] / 100)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / r["copy_bw_gbps"])
        assert r["speedup_vs_compile"] is None  # --no-compile
        assert 0 <= r["rel_err"] < 1e-5, r
        assert set(r["rel_err_parts"]) == ({"out"} if r["case"] == "fwd" else {"grad_x", "grad_params"})
        assert r["rel_err"] == max(r["rel_err_parts"].values())
        assert r["deterministic_bitwise"] is True
        assert r["launches"] is None and r["peak_mem_bytes"] is None  # GPU only
        if r["impl"] == "eager_nchw":
            assert r["speedup_vs_eager_nchw"] == 1.0


def test_unavailable_backend_is_a_row(results):
    _, data = results
    rows = [r for r in data["rows"] if r["impl"] == "fused_cuda"]
    assert sorted(r["case"] for r in rows) == ["fwd", "fwd+bwd"]
    assert all(r["status"] == "unavailable" and "'cuda' has no kernel on cpu" in r["error"] and r["median_ms"] is None
               for r in rows)


def test_env_checks_and_files(results):
    stem, data = results
    env = data["env"]
    assert {"date", "torch", "triton", "python", "device", "git", "threads"} <= set(env)
    assert math.isfinite(env["copy_bw_gbps"]) and env["copy_bw_gbps"] > 0
    assert stem.name == f"ppm_cpu_{env['date'][:10]}"
    checks = {(c["impl"], c["check"]): c for c in data["checks"]}
    speed = checks["fused_cpp", "fwd+bwd >= 2x eager NCHW"]
    assert speed["rows"] == 1 and speed["status"] in ("PASS", "FAIL")
    assert checks["fused_cpp", "rel err <= 1e-5 (fp32)"]["status"] == "PASS"
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("| case | config | impl |")
    assert md.count("| fwd+bwd | N2 C64 12x12 fp32 |") == 3 and "unavailable: fused_cuda" in md
    assert f"**{speed['status']}** fused_cpp: fwd+bwd >= 2x eager NCHW" in md
    png = stem.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_checks_decide(ppm_bench):
    """The target lines: PASS / FAIL on the worst matching row, SKIP with no rows."""
    def row(impl, case, median, speedup, n=8, dtype="bf16", graph=False):
        return {**dict.fromkeys(ppm_bench.ROW_KEYS), "impl": impl, "case": case, "status": "ok", "N": n, "H": 60,
                "W": 60, "C": 2048, "dtype": dtype, "graph": graph, "median_ms": median,
                "speedup_vs_eager_nchw": speedup, "pct_copy_bw": 90.0, "rel_err": 1e-3,
                "deterministic_bitwise": True}
    rows = [row("fused_triton", "fwd", 0.1, 6.0), row("fused_triton", "fwd", 0.2, 4.0, n=16),
            row("fused_triton", "fwd", 0.02, 9.0, n=1, graph=True), row("eager_nchw", "fwd", 1.0, 1.0)]
    checks = {c["check"]: c for c in ppm_bench.evaluate_checks(rows, "cuda")}
    assert checks["fwd >= 5x eager NCHW"]["status"] == "FAIL" and checks["fwd >= 5x eager NCHW"]["worst"] == 4.0
    assert checks["fwd >= 85% copy BW on 3P"]["status"] == "PASS"
    assert checks["N=1 fwd 60x60 graph replay <= 30 us"]["status"] == "PASS"
    assert checks["fwd >= 2x compile"]["status"] == "SKIP"  # no compile rows
    assert checks["fwd+bwd >= 80% copy BW on 6P"]["status"] == "SKIP"
    assert all(c["impl"] == "fused_triton" for c in checks.values())


class _TinyGraph(torch.nn.Module):
    """A grouped 3x3 conv, a dilated 3x3 conv and a MatMul: the node kinds export_bench counts."""

    def __init__(self):
        super().__init__()
        self.grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.dilated = torch.nn.Conv2d(6, 8, 3, padding=2, dilation=2, bias=False)
        self.proj = torch.nn.Parameter(torch.randn(7, 5))

    def forward(self, x):
        return self.dilated(self.grouped(x)) @ self.proj


def test_export_bench_flop_counter(load_bench, tmp_path):
    """FLOPs of a graph exported with dynamic batch and height, counted at another batch and height: the shapes
    come from the ONNX Runtime run; the head conv is the undilated 3x3 conv that reads >= C channels."""
    export_bench = load_bench("export_bench")
    path = tmp_path / "tiny.onnx"
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("height", min=1, max=64)}
    torch.onnx.export(_TinyGraph().eval(), (torch.randn(2, 4, 5, 7),), path, dynamo=True, dynamic_shapes={"x": dims},
                      verbose=False)
    n, h, w = 3, 6, 7
    records = export_bench.graph_flops(path, (n, 4, h, w))
    grouped, dilated = 2 * n * 6 * h * w * (4 // 2) * 9, 2 * n * 8 * h * w * 6 * 9
    assert [(r["op"], r["flops"]) for r in records] == [("Conv", grouped), ("Conv", dilated),
                                                         ("MatMul", 2 * n * 8 * h * 5 * w)]
    assert [(r["cin"], r["kernel"], r["dilation"]) for r in records[:2]] == [(4, [3, 3], [1, 1]), (6, [3, 3], [2, 2])]
    assert export_bench.head_convs(records, 4) == records[:1]          # the dilated conv is backbone-like
    assert export_bench.head_convs(records, 5) == []
    assert export_bench.flop_summary(records, 4) == {
        "head_conv_gflops": grouped / 1e9, "head_conv_cin": [4], "matmul_gflops": 2 * n * 8 * h * 5 * w / 1e9,
        "matmuls": 1, "conv_gflops": (grouped + dilated) / 1e9}


def test_export_bench_targets(load_bench):
    export_bench = load_bench("export_bench")
    speed, flops = export_bench.SPEED, export_bench.FLOPS
    ratios = {"a": {speed: 1.0, flops: 0.5, "onnx_unfused / onnx_fused": 1.4},
              "b": {speed: 0.9, flops: 0.56, "onnx_unfused / onnx_fused": 1.1}}
    met = {(t["case"], t["target"].split()[0]): t["met"] for t in export_bench.check_targets(ratios)}
    assert met == {("a", "eager_fused_fp32"): True, ("a", "fused"): True, ("b", "eager_fused_fp32"): False,
                   ("b", "fused"): False}
