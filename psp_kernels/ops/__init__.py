"""The fused PPM ops, registered as ``torch.library`` custom ops in namespace ``psp``."""

from .pooling import multibin_avg_pool
from .projection import project_bn_relu
from .upsample import upsample_concat

__all__ = ["multibin_avg_pool", "project_bn_relu", "upsample_concat"]
