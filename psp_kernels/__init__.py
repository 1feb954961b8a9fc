"""psp_kernels: fused kernels for PSPNet's pyramid pooling module, head and dilated backbone.

``import psp_kernels`` registers the ``psp::`` custom ops and gives:

- :class:`PyramidPooling`: drop-in for semseg's ``PPM`` (same state_dict keys) running the fused ops.
- :class:`PSPHead`: the PPM + 3x3 conv + BN + ReLU of semseg's head without the concat (same keys); its
  conv is a :class:`HeadConv`, and the branch-term add + BN + ReLU is the op :func:`head_bn_relu`.
- the ops :func:`multibin_avg_pool`, :func:`project_bn_relu`, :func:`upsample_concat`, and the whole
  module as one op, :func:`pyramid_pooling`.
- the backbone's conv + BatchNorm (+ residual) + ReLU: the ops :func:`conv_bias_act` (inference, BN folded)
  and :func:`conv_bn_act_train` (training, statistics from the conv's epilogue), and
  :func:`psp_kernels.conv.conv_bn_act` for an ``nn.Conv2d`` / BatchNorm pair.
- backend choice: :func:`set_backend`, :func:`get_backend`, :func:`use_backend`
  (``auto`` / ``triton`` / ``cpp`` / ``reference``).
- :mod:`psp_kernels.reference`: the pure-PyTorch oracle (semseg's math).
"""

from . import reference
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .geometry import DEFAULT_BINS, split_bins
from .head import HeadConv, PSPHead
from .modules import PyramidPooling
from .ops import (conv_bias_act, conv_bn_act_train, head_bn_relu, multibin_avg_pool, project_bn_relu, pyramid_pooling,
                  upsample_concat)

__all__ = [
    "BACKENDS", "DEFAULT_BINS", "HeadConv", "PSPHead", "PyramidPooling", "conv_bias_act", "conv_bn_act_train",
    "get_backend", "head_bn_relu",
    "multibin_avg_pool", "project_bn_relu", "pyramid_pooling", "reference", "set_backend", "split_bins",
    "upsample_concat", "use_backend",
]
