"""The ``psp::`` custom ops: one module per op family, each holding the op's schema, fake kernel, autograd,
argument checks and public function; the kernels each op runs are chosen by ``psp_kernels.dispatch``."""

from .conv import folded_conv, training_conv
from .head import add_branch_bn_relu
from .pooling import multibin_avg_pool
from .ppm import pyramid_pooling
from .reduction import reduction_conv_bn_relu
from .upsample import upsample_concat

__all__ = ["add_branch_bn_relu", "folded_conv", "multibin_avg_pool", "pyramid_pooling", "reduction_conv_bn_relu",
           "training_conv", "upsample_concat"]
