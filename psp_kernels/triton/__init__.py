"""Triton kernels: one function per ``psp::`` kernel op, named as the op and with its schema (the ``triton``
candidate of :data:`psp_kernels.dispatch.KERNEL_TABLE`). Decomposition, per op:

==================================  ==========================================================  =========
op                                  parallel decomposition                                      launches
==================================  ==========================================================  =========
multibin_avg_pool                   program per (n, channel block): one pass over x, all bins     1
multibin_avg_pool_backward          program per (channel block, row block, n): gather            1
multibin_avg_pool_with_concat       the pooling that also copies x into the concat buffer         1
multibin_avg_pool_backward_add      the pooling backward plus the pass-through gradient           1
reduction_conv_bn_relu              parameter pack (torch.cat); program per (row tile, R block): 2 / 3
                                    GEMM + BatchNorm + ReLU (eval / training: per-tile stats,
                                    then an ordered merge + BatchNorm + ReLU per tile)
reduction_conv_bn_relu_backward     pack; BatchNorm backward in two passes per (row tile, R        5
                                    block); dgrad per (row tile, C block); wgrad per (bin, R
                                    block, C block)
upsample_concat                     program per (hw block, channel block, n): copy x /            1
                                    interpolate
upsample_concat_backward            program per (n, bin, R block): separable transposed interp.   1
upsample_into                       upsample_concat writing only the branch channels             1
add_branch_bn_relu                  program per ((n, h) row, O block): branch term + add +    1 / 3-4
                                    BatchNorm + ReLU (eval / training: per-row stats, two-level
                                    ordered merge (one level up to 32 rows), normalise)
add_branch_bn_relu_backward         per-row BatchNorm sums, two-level ordered sum, grad_conv_out  3 / 4
                                    + grad_branch_rows per row
folded_conv                         implicit GEMM per (pixel block, out-channel block) with       1
                                    bias + residual + ReLU epilogue (backbone convs, BN folded)
training_conv                       the implicit GEMM storing the conv output and per-tile      3 / 4
                                    (mean, M2); two-level ordered merge of the tiles (one level
                                    up to 32 tiles); BatchNorm + residual + ReLU per tile
training_conv_bn_backward           per-tile BatchNorm sums, two-level ordered sum (one level    3 / 4
                                    up to 64 rows), gradients per tile
==================================  ==========================================================  =========

The pooling kernels take the nested path (fine cells, then sums of them) when the windows nest, e.g.
bins 1/2/3/6 at 60x60 or 90x90, else the general path (elementary row segments; see pooling.py). The
whole-PPM op runs multibin_avg_pool_with_concat, reduction_conv_bn_relu, upsample_into: 4 launches in eval.

Every output element is written by exactly one program that reduces in a fixed order: results are
bitwise deterministic and no kernel uses atomics. Accumulation is fp32 (fp64 for fp64 inputs).

``KERNELS`` lists every ``@triton.jit`` kernel with the compile signatures/constexprs of each block
config its launcher can pick (fp16/bf16/fp32/fp64), for compile-only tests without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import conv, head, pooling, reduction, upsample
from .common import CompileConfig
from .conv import folded_conv, training_conv, training_conv_bn_backward
from .head import add_branch_bn_relu, add_branch_bn_relu_backward
from .pooling import (multibin_avg_pool, multibin_avg_pool_backward, multibin_avg_pool_backward_add,
                      multibin_avg_pool_with_concat)
from .reduction import reduction_conv_bn_relu, reduction_conv_bn_relu_backward
from .upsample import upsample_concat, upsample_concat_backward, upsample_into

__all__ = ["multibin_avg_pool", "multibin_avg_pool_backward", "multibin_avg_pool_with_concat",
           "multibin_avg_pool_backward_add", "reduction_conv_bn_relu", "reduction_conv_bn_relu_backward",
           "upsample_concat", "upsample_concat_backward", "upsample_into", "add_branch_bn_relu",
           "add_branch_bn_relu_backward", "folded_conv", "training_conv", "training_conv_bn_backward", "KERNELS",
           "KernelEntry", "CompileConfig"]


class KernelEntry(NamedTuple):
    """A ``@triton.jit`` kernel and the configs to compile it with (``triton.compile(ASTSource(...))``)."""

    name: str
    fn: object
    configs: tuple


def _registry(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    by_kernel: dict = {}
    for module in (pooling, reduction, upsample, head, conv):
        for fn, cfg in module.compile_configs(dtypes):
            by_kernel.setdefault(fn, []).append(cfg)
    return tuple(KernelEntry(fn.__name__, fn, tuple(cfgs)) for fn, cfgs in by_kernel.items())


KERNELS = _registry()
