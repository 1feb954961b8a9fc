"""Triton backend: the six functions of the backend interface (see :mod:`psp_kernels.reference`).

==================  ==============================================================  =========
function            parallel decomposition                                          launches
==================  ==============================================================  =========
pool_forward        program per (n, channel block): one pass over x, all bins         1
pool_backward       program per (n, channel block, row block): gather, no atomics     1
project_forward     parameter pack (torch.cat); program per (bin, R block):           2
                    GEMM + batch stats + BN + ReLU
project_backward    pack; BN bwd per (bin, R block); dgrad / wgrad tiles per bin      4
upsample_forward    program per (hw block, channel block, n): copy x / interpolate     1
upsample_backward   program per (n, bin, R block): separable transposed interp.       1
pool_concat_fwd     pool_forward that also copies x into the concat buffer            1
upsample_into       upsample_forward writing only the branch channels                 1
pool_backward_add   pool_backward plus the pass-through gradient, one pass            1
head_forward        program per ((n, h) row, O block): branch term + add + BN +    1 / 3
                    ReLU (eval / training: stats, ordered merge, normalise)
head_backward       per-row BN sums, ordered sum, grad_y + grad_u per row             3
conv_bias_act       implicit GEMM per (pixel block, out-channel block) with bias +    1
                    residual + ReLU epilogue (backbone convs, BN folded; conv.py)
conv_bn_train_fwd   the implicit GEMM storing y and per-tile (mean, M2); ordered       3
                    merge of the tiles; BN + residual + ReLU per (pixel, channel) tile
bn_act_backward     per-tile BN sums, ordered sum, grad_y + grad_residual per tile     3
==================  ==============================================================  =========

The pooling kernels take the nested path (fine cells, then sums of them) when the windows nest, e.g.
bins 1/2/3/6 at 60x60 or 90x90 (see pooling.py). The whole-PPM op runs pool_concat_forward,
project_forward, upsample_into: 4 launches in eval.

Every output element is written by exactly one program that reduces in a fixed order: results are
bitwise deterministic and no kernel uses atomics. Accumulation is fp32 (fp64 for fp64 inputs).

``KERNELS`` lists every ``@triton.jit`` kernel with the compile signatures/constexprs of each block
config its launcher can pick (fp16/bf16/fp32/fp64), for compile-only tests without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import conv, head, pooling, projection, upsample
from .common import CompileConfig
from .conv import bn_act_backward, conv_bias_act, conv_bn_train_forward
from .head import head_backward, head_forward
from .pooling import pool_backward, pool_backward_add, pool_concat_forward, pool_forward
from .projection import project_backward, project_forward
from .upsample import upsample_backward, upsample_forward, upsample_into

__all__ = ["pool_forward", "pool_backward", "project_forward", "project_backward", "upsample_forward",
           "upsample_backward", "pool_concat_forward", "upsample_into", "pool_backward_add", "head_forward",
           "head_backward", "conv_bias_act", "conv_bn_train_forward", "bn_act_backward", "KERNELS",
           "KernelEntry", "CompileConfig"]


class KernelEntry(NamedTuple):
    """A ``@triton.jit`` kernel and the configs to compile it with (``triton.compile(ASTSource(...))``)."""

    name: str
    fn: object
    configs: tuple


def _registry(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    by_kernel: dict = {}
    for module in (pooling, projection, upsample, head, conv):
        for fn, cfg in module.compile_configs(dtypes):
            by_kernel.setdefault(fn, []).append(cfg)
    return tuple(KernelEntry(fn.__name__, fn, tuple(cfgs)) for fn, cfgs in by_kernel.items())


KERNELS = _registry()
