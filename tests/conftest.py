"""Test-session setup: the Triton interpreter for CPU tensors, and shared fixtures.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is set here, at collection.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
