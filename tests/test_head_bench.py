"""Smoke test of bench/head_bench.py on CPU: a tiny head and PSPNet-50 step end to end; JSON and markdown."""

from __future__ import annotations

import json
import math


def test_head_bench_tiny(tmp_path, load_bench):
    module = load_bench("head_bench")
    stem = module.main(["--device", "cpu", "--batch", "2", "--channels", "32", "--size", "12", "--rounds", "1",
                        "--no-compile", "--model-size", "33", "--out", str(tmp_path)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    heads = {(r["case"], r["impl"]): r for r in rows if r["case"] in ("fwd", "fwd+bwd")}
    assert set(heads) == {(c, i) for c in ("fwd", "fwd+bwd") for i in ("eager_concat", "concat_free")}
    for r in heads.values():
        assert r["status"] == "ok" and r["median_ms"] > 0 and math.isfinite(r["tflops"])
        assert r["rel_err"] < 1e-5 and r["deterministic_bitwise"]
    # The concat conv does twice the x-half conv's FLOPs; only the train case saves tensors for backward.
    assert heads[("fwd", "eager_concat")]["flops"] == 2 * heads[("fwd", "concat_free")]["flops"]
    free, concat = heads[("fwd+bwd", "concat_free")], heads[("fwd+bwd", "eager_concat")]
    assert "saved_bytes" not in heads[("fwd", "concat_free")]
    assert 0 < free["saved_bytes_beyond_x"] < free["saved_bytes"]          # x itself is saved (conv wgrad)
    # the memory target: at least 2*N*C*H*W elements (fp32 here) fewer saved for backward
    assert free["saved_bytes_beyond_x"] + 2 * 2 * 32 * 12 * 12 * 4 <= concat["saved_bytes_beyond_x"]
    steps = {(r["impl"], r["dtype"]): r for r in rows if r["case"] == "train step"}
    assert set(steps) == {(i, d) for i in ("pspnet50_fused", "pspnet50_reference") for d in ("fp32", "bf16 autocast")}
    assert all(steps[("pspnet50_reference", d)]["speedup_vs_reference"] == 1.0 for d in ("fp32", "bf16 autocast"))
    text = stem.with_suffix(".md").read_text()
    assert "concat_free" in text and "pspnet50_fused" in text
