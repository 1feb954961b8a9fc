"""pytest-benchmark session for bench/ (not part of ``pytest tests``: pyproject's testpaths is ``tests``).

Independent of tests/conftest.py: no Triton interpreter, no Inductor cache set-up. Imports this checkout's
psp_kernels, seeds every benchmark, and adds the torch build and thread count to the machine info that
pytest-benchmark stores with every saved run (``--benchmark-autosave``, ``--benchmark-json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's psp_kernels


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
