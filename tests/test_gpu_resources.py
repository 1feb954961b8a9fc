"""bench/gpu_resources.py without a GPU: the launch specialisation Triton's JIT would apply, the occupancy
calculator, and one launch compiled for sm_90 with its registers, spills and tensor-core instructions read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resources(load_bench):
    return load_bench("gpu_resources")


def test_specialisation_is_the_jits(resources):
    cfg = SimpleNamespace(signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "m": "i32", "k": "i32",
                                     "BLOCK": "constexpr"}, constexprs={"BLOCK": 64})
    base = torch.empty(64, device="meta")
    signature, constexprs, attrs = resources.specialisation(cfg, (base, base[1:], 32, 1, 7))
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}   # base[1:]: 4 bytes in
    assert signature["m"] == "constexpr" and constexprs == {"BLOCK": 64, "m": 1}
    assert signature["k"] == "i32" and signature["n"] == "i32"


def test_occupancy_calculator(resources):
    assert resources.occupancy(255, 0, 4, 90) == 0.125     # 8192 registers a warp: 2 blocks of 4 warps
    assert resources.occupancy(128, 1024, 4, 90) == 0.25
    assert resources.occupancy(32, 0, 4, 90) == 1.0        # the 64-warp limit
    assert resources.occupancy(32, 100 * 1024, 4, 90) == 2 * 4 / 64    # shared memory: 2 blocks of 101 KiB
    assert resources.occupancy(32, 100 * 1024, 4, 80) == 1 * 4 / 64


def test_every_kernel_is_launched_with_a_registered_config(resources):
    """61x61: the general (not nested) pooling path."""
    specs = resources.collect(shapes=((1, 60), (16, 90), (8, 61)), dtypes=(torch.bfloat16, torch.float32))
    kernels = {s["kernel"] for s in specs}
    assert kernels == {k for v in resources.MODULE_KERNELS.values() for k in v}
    assert all(s["launches"] for s in specs)


_ONE = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import gpu_resources as g
specs = g.collect(shapes=((8, 60),), dtypes=(torch.bfloat16,))
spec = next(s for s in specs if s["kernel"] == "_reduction_fwd_kernel")
print("@@" + json.dumps(g.compile_one(spec, 90)))
"""


def test_one_launch_compiled_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _ONE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.split("@@", 1)[1])
    assert "error" not in row, row
    assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0 and 0 < row["occupancy"] <= 1
    assert row["wgmma"] > 0, "the bf16 1x1 conv's dot runs on Hopper's tensor cores"
    assert row["launches"] and row["launches"][0].startswith("bf16")
