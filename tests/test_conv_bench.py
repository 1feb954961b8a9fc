"""Smoke test of bench/conv_bench.py on CPU: every layer row and the PSPNet-50 rows at tiny sizes, JSON and markdown."""

from __future__ import annotations

import json
import math


def test_conv_bench_tiny(tmp_path, load_bench):
    module = load_bench("conv_bench")
    stem = module.main(["--device", "cpu", "--batch", "1", "--size", "9", "--rounds", "1", "--reps", "1",
                        "--no-compile", "--model-size", "41", "--train-step", "--step-batch", "2", "--step-size", "33",
                        "--out", str(tmp_path)])
    data = json.loads(stem.with_suffix(".json").read_text())
    rows = data["rows"]
    layers = {(r["case"], r["mode"], r["impl"]): r for r in rows if not r["case"].startswith("PSPNet-50")}
    assert set(layers) == {(spec[0], mode, impl) for spec in module.LAYERS for mode in ("eval", "train fwd")
                           for impl in ("eager", "fused")}
    for key, r in layers.items():
        assert r["status"] == "ok" and r["median_ms"] > 0 and math.isfinite(r["tflops"]), key
        assert r["rel_err"] < 1e-5, (key, r["rel_err"])
        assert r["speedup_vs_eager"] > 0
    layer4 = layers[("layer4.conv2 3x3 d4", "eval", "fused")]
    assert layer4["dilation"] == 4 and layer4["tflops"] == 2 * 9 * 9 * 512 * 512 * 9 / (layer4["median_ms"] * 1e-3) / 1e12
    steps = {r["impl"]: r for r in rows if r["case"] == "PSPNet-50 train step"}
    assert set(steps) == {"pspnet50_fused", "pspnet50_eager"} and steps["pspnet50_eager"]["speedup_vs_eager"] == 1.0
    models = {(r["impl"], r["dtype"], r["layout"]): r for r in rows if r["case"] == "PSPNet-50 eval forward"}
    assert set(models) == {(impl, precision, layout) for impl in ("pspnet50_fused", "pspnet50_eager")
                           for precision in ("fp32", "bf16_autocast") for layout in ("nchw", "channels_last")}
    for (impl, precision, layout), r in models.items():
        assert r["status"] == "ok", r
        assert r["speedup_vs_eager"] == 1.0 if impl == "pspnet50_eager" else r["speedup_vs_eager"] > 0
        assert r["rel_err"] < (1e-4 if precision == "fp32" else 5e-2), (impl, precision, layout, r["rel_err"])
    assert data["env"]["matmul_peak_tflops"] > 0
    md = stem.with_suffix(".md").read_text()
    assert "| N1 41x41 bf16_autocast channels_last | pspnet50_fused |" in md
    assert md.count("PSPNet-50 eval fused >= 1.3x eager") == len(module.MODEL_TARGETS)
