"""psp_kernels: fused kernels for PSPNet's pyramid pooling module, head and dilated backbone.

``import psp_kernels`` registers the ``psp::`` custom ops, loads the compiled kernels, and gives:

- :class:`PyramidPooling`: drop-in for semseg's ``PPM`` (same state_dict keys) running the fused ops.
- :class:`PSPHead`: the PPM + 3x3 conv + BN + ReLU (+ classifier) of semseg's head without the concat (same
  keys); its conv is a :class:`HeadConv`, and the branch-term add + BN + ReLU is the op
  :func:`add_branch_bn_relu`.
- the ops :func:`multibin_avg_pool`, :func:`reduction_conv_bn_relu`, :func:`upsample_concat`, and the whole
  module as one op, :func:`pyramid_pooling`.
- the backbone's conv + BatchNorm (+ residual) + ReLU: the ops :func:`folded_conv` (inference, BatchNorm
  folded) and :func:`training_conv` (training, statistics from the conv's epilogue), and
  :func:`fused_conv_bn` for an ``nn.Conv2d`` / BatchNorm pair.
- the kernel table (:mod:`psp_kernels.dispatch`): :func:`print_dispatch`, :func:`use_backend`,
  :func:`set_backend`, :func:`set_autotune`, :func:`save_dispatch_table`, :func:`load_dispatch_table`.
- :mod:`psp_kernels.reference`: the pure-PyTorch oracle (semseg's math).
"""

import os

from . import ops as _ops  # noqa: F401  (defines the psp:: ops before the compiled kernels register)
from . import reference
from ._extension import load_extension
from .dispatch import (autotune_enabled, get_backend, load_table as load_dispatch_table, print_table as print_dispatch,
                       save_table as save_dispatch_table, set_autotune, set_backend, use_backend)
from .geometry import DEFAULT_BINS, split_bins
from .nn import HeadConv, PSPHead, PyramidPooling, fold_bn, fused_conv_bn
from .ops import (add_branch_bn_relu, folded_conv, multibin_avg_pool, pyramid_pooling, reduction_conv_bn_relu,
                  training_conv, upsample_concat)

load_extension()
if os.environ.get("PSP_KERNELS_BACKEND"):      # e.g. PSP_KERNELS_BACKEND=reference: every device where it runs
    set_backend(os.environ["PSP_KERNELS_BACKEND"])

__all__ = [
    "DEFAULT_BINS", "HeadConv", "PSPHead", "PyramidPooling", "add_branch_bn_relu", "autotune_enabled", "fold_bn",
    "folded_conv", "fused_conv_bn", "get_backend", "load_dispatch_table", "multibin_avg_pool", "print_dispatch",
    "pyramid_pooling", "reduction_conv_bn_relu", "reference", "save_dispatch_table", "set_autotune", "set_backend",
    "split_bins", "training_conv", "upsample_concat", "use_backend",
]
