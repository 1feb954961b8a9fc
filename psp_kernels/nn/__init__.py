"""Modules and module-level helpers on the ``psp::`` ops, with semseg's state_dict layout:
:class:`PyramidPooling` (``ppm.py``), :class:`PSPHead` and the concat-free head (``head.py``), BatchNorm folding
and the backbone's fused conv + BN + ReLU (``conv.py``)."""

from .conv import fold_bn, foldable, fused_conv_bn, fused_conv_bn_sequence
from .head import HeadConv, PSPHead, branch_conv, branch_factors, concat_free_head, psp_head
from .ppm import PyramidPooling

__all__ = ["HeadConv", "PSPHead", "PyramidPooling", "branch_conv", "branch_factors", "concat_free_head", "fold_bn",
           "foldable", "fused_conv_bn", "fused_conv_bn_sequence", "psp_head"]
