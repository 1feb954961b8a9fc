"""Smoke test of bench/ppm_bench.py on CPU: a tiny shape end to end; JSON rows, markdown and PNG checked."""

from __future__ import annotations

import json
import math

import pytest

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
