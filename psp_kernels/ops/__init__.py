"""The fused PPM and head ops, registered as ``torch.library`` custom ops in namespace ``psp``."""

from .conv import conv_bias_act, conv_bn_act_train
from .head import head_bn_relu
from .pooling import multibin_avg_pool
from .ppm import pyramid_pooling
from .projection import project_bn_relu
from .upsample import upsample_concat

__all__ = ["conv_bias_act", "conv_bn_act_train", "head_bn_relu", "multibin_avg_pool", "project_bn_relu",
           "pyramid_pooling", "upsample_concat"]
