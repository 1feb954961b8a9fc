"""scripts/gpu_check.sh and bench/gpu_check.py on the CPU: the one-line refusal without a GPU, and every
stage of the driver at tiny shapes (``--small --device cpu``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a CUDA GPU")
def test_script_refuses_without_a_gpu_in_one_line(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible to torch on this machine; it needs an NVIDIA GPU (H100 or H200)"]
    assert not out.exists()


def test_every_stage_at_tiny_shapes_on_cpu(tmp_path, capsys, load_bench):
    gpu_check = load_bench("gpu_check")
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--small", "--seconds", "300"]) == 0
    assert f"results in {tmp_path}" in capsys.readouterr().out
    stages = {s["name"]: s for s in json.loads((tmp_path / "stages.json").read_text())}
    assert list(stages) == ["environment", "tests", "determinism", "ppm", "head", "conv"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert " passed" in stages["tests"]["detail"]
    for stage in stages.values():
        for name in stage["files"]:
            assert (tmp_path / name).stat().st_size > 0, name
    assert any(f.endswith(".json") and f.startswith("ppm_cpu") for f in stages["ppm"]["files"])
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["native_kernels"]["multibin_avg_pool"] is True
    det = json.loads((tmp_path / "determinism.json").read_text())
    assert det["float32"] is True and det["bfloat16"] is True
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| ok |") == 6


def test_determinism_reports_differing_bits(monkeypatch, load_bench):
    gpu_check = load_bench("gpu_check")
    calls = iter(range(100))

    def nondeterministic(device, dtype, small):
        return lambda: [torch.full((2,), float(next(calls)))]
    monkeypatch.setattr(gpu_check, "_ppm_and_head_runs", nondeterministic)
    result = gpu_check.determinism(torch.device("cpu"), runs=3, small=True)
    assert result["float32"] is False and result["bfloat16"] is False


def test_stage_time_limits(tmp_path, load_bench):
    gpu_check = load_bench("gpu_check")
    sleep = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    stage = gpu_check.run_subprocess(gpu_check.Stage("slow"), sleep, tmp_path / "slow.log", 2,
                                     gpu_check.last_line_with("started"))
    assert stage.status == "skipped" and stage.detail == "no time left"
    stage = gpu_check.run_subprocess(gpu_check.Stage("slow"), sleep, tmp_path / "slow.log", 6,
                                     gpu_check.last_line_with("started"))
    assert stage.status == "timeout" and stage.detail == "started" and 5.5 < stage.seconds < 20
    failing = [sys.executable, "-c", "raise SystemExit('broken')"]
    stage = gpu_check.run_subprocess(gpu_check.Stage("bad"), failing, tmp_path / "bad.log", 60,
                                     gpu_check.last_line_with("Error"))
    assert stage.status == "failed" and stage.detail == "broken"
