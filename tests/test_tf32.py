"""TF32: the kernels' fp32 convolution dots follow ``torch.backends.cudnn.allow_tf32`` as the eager cuDNN
convolution they replace does (``psp_kernels.triton.common.conv_dot_precision``).

On CPU: the policy itself. On a GPU (skipped without one), for the Triton backbone conv (inference and
training) and the PPM's 1x1 reduction conv in fp32: with the flag on, the result is within 2x cuDNN's own
TF32 error against the fp64 oracle plus the fp32 atol (the one low-precision rule, PyTorch's own result being
cuDNN's convolution of the same fp32 inputs under the same flag), and it differs from the flag-off result
(TF32 did run); with the flag off, the rule holds against cuDNN in IEEE fp32. The other tests run CUDA with
the flag off (tests/conftest.py), so they judge IEEE fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import psp_kernels
from helpers import assert_low_precision_close, cudnn_tf32, rand, requires_cuda
from psp_kernels import reference
from psp_kernels.geometry import bin_offsets
from psp_kernels.triton.common import conv_dot_precision

ops = torch.ops.psp


@pytest.mark.parametrize("allowed", [True, False])
def test_policy_follows_the_cudnn_flag(allowed):
    with cudnn_tf32(allowed):
        assert conv_dot_precision(torch.float32, torch.device("cuda", 1)) == ("tf32" if allowed else "ieee")
        assert conv_dot_precision(torch.float32, torch.device("meta")) == ("tf32" if allowed else "ieee")
        assert conv_dot_precision(torch.float32, torch.device("cpu")) == "ieee"     # the interpreter: IEEE
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            assert conv_dot_precision(dtype, torch.device("cuda")) == "ieee"


def _conv_inputs(c=64, o=96, hw=23):
    x = rand(2, c, hw, hw, seed=1).float().cuda().contiguous(memory_format=torch.channels_last)
    weight = (rand(o, c, 3, 3, seed=2) / (9 * c) ** 0.5).float().cuda().contiguous(memory_format=torch.channels_last)
    return x, weight


@requires_cuda
@pytest.mark.parametrize("allowed", [True, False], ids=["tf32", "ieee"])
def test_triton_conv_follows_the_flag(allowed):
    """``psp::folded_conv`` (Triton) against cuDNN's conv + bias + ReLU under the same flag."""
    x, weight = _conv_inputs()
    bias = rand(weight.shape[0], seed=3).float().cuda()
    args = (x, weight, bias, None, 1, 2, 2, True)
    oracle = torch.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 2, 2))
    with psp_kernels.use_backend("triton", "cuda"):
        with cudnn_tf32(allowed):
            ours, cudnn = ops.folded_conv(*args), torch.relu(F.conv2d(x, weight, bias, 1, 2, 2))
        with cudnn_tf32(not allowed):
            other = ops.folded_conv(*args)
    assert_low_precision_close(ours, cudnn, oracle, "folded_conv")
    assert not torch.equal(ours, other), "the flag did not change the kernel's precision"


@requires_cuda
def test_triton_training_conv_runs_tf32():
    """``psp::training_conv`` (Triton): the conv output (BatchNorm's input) within 2x cuDNN's TF32 error."""
    x, weight = _conv_inputs()
    ones = torch.ones(weight.shape[0], device="cuda")
    oracle = F.conv2d(x.double(), weight.double(), None, 1, 1, 1)
    with psp_kernels.use_backend("triton", "cuda"), cudnn_tf32(True):
        _, bn_input, _, _ = ops.training_conv(x, weight, ones, ones * 0, None, 1, 1, 1, True, 1e-5)
        cudnn = F.conv2d(x, weight, None, 1, 1, 1)
    assert_low_precision_close(bn_input, cudnn, oracle, "training_conv bn_input")


@requires_cuda
@pytest.mark.parametrize("allowed", [True, False], ids=["tf32", "ieee"])
def test_triton_reduction_conv_follows_the_flag(allowed):
    """``psp::reduction_conv_bn_relu`` (Triton, eval): bn_input, the 1x1 convs' output, against cuDNN's 1x1
    conv of each bin's pooled map under the same flag."""
    n, c, r, bins = 2, 256, 64, (1, 2, 3, 6)
    pooled = psp_kernels.multibin_avg_pool(rand(n, c, 24, 24, seed=4).float().cuda(), bins)
    weights = [(rand(r, c, 1, 1, seed=5 + k) / c ** 0.5).float().cuda() for k in range(len(bins))]
    vec = [torch.ones(r, device="cuda") for _ in bins]
    args = (pooled, weights, vec, [v * 0 for v in vec], [v * 0 for v in vec], vec, list(bins), False, 1e-5)
    oracle = reference.reduction_conv_bn_relu(pooled.double(), [w.double() for w in weights], *args[2:])[1]
    with psp_kernels.use_backend("triton", "cuda"):
        with cudnn_tf32(allowed):
            ours = ops.reduction_conv_bn_relu(*args)[1]
            cudnn = torch.cat([F.conv2d(pooled[:, :, off:off + b * b].reshape(n, c, b, b), w).flatten(2)
                               for b, off, w in zip(bins, bin_offsets(bins), weights)], dim=2)
        with cudnn_tf32(not allowed):
            other = ops.reduction_conv_bn_relu(*args)[1]
    assert_low_precision_close(ours, cudnn, oracle, "reduction bn_input", dtype=torch.float32)
    assert not torch.equal(ours, other), "the flag did not change the kernel's precision"
