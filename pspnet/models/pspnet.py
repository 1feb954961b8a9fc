"""PSPNet: dilated ResNet + pyramid pooling + 3x3 classifier, with the deep-supervision aux head.

Reproduces hszhao/semseg ``model/pspnet.py`` (structure, state_dict keys, forward, loss) with the head
built as a :class:`psp_kernels.PSPHead` (same keys; fused pyramid pooling and the concat-free head optional)
and the backbone's conv + BN + ReLU optionally fused (:func:`psp_kernels.nn.conv.fused_conv_bn`).
Paper: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, Sec. 3 (3.2 PPM, 3.3 deep supervision,
auxiliary loss weight 0.4).

Differences from semseg, all additive:

- any input size: semseg asserts ``(H - 1) % 8 == 0``; here other sizes work (see :meth:`PSPNet.forward`);
  for ``8k + 1`` inputs the output is bit-for-bit semseg's definition.
- ``layers`` 18/34 (BasicBlock backbones, dilated as described in :func:`~pspnet.models.resnet.dilate_layer`)
  besides 50/101/152.
- ``forward`` in train mode without ``y`` returns logits instead of failing.
- arguments are validated with ValueError/TypeError instead of ``assert``.
- no ``use_ppm`` / ``pretrained`` switches: the PPM is always used; load weights with
  :func:`load_state_dict`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from psp_kernels import PSPHead
from psp_kernels.geometry import DEFAULT_BINS, check_bins, is_channels_last, memory_format
from psp_kernels.nn import fused_conv_bn_sequence, psp_head

from ..loss import PSPLoss
from .resnet import RESNET_BLOCKS, ResNet, dilate_layer

__all__ = ["PSPNet", "load_state_dict", "LoadResult", "output_size"]

ZOOM_FACTORS = (1, 2, 4, 8)


def output_size(height: int, width: int, zoom_factor: int = 8) -> tuple[int, int]:
    """Spatial size of PSPNet's logits for an input of ``height x width``.

    ``(H, W)`` when ``zoom_factor == 8``, else ``((H - 1) // 8 * zoom_factor + 1, (W - 1) // 8 * zoom_factor
    + 1)`` (semseg's formula; for ``zoom_factor == 1`` this is the stride-8 feature size, and for
    ``8k + 1`` inputs both branches agree with semseg).
    """
    if zoom_factor == 8:
        return height, width
    return (height - 1) // 8 * zoom_factor + 1, (width - 1) // 8 * zoom_factor + 1


def _aux_head(in_channels: int, mid_channels: int, classes: int, dropout: float) -> nn.Sequential:
    """semseg's ``aux`` head: 3x3 conv (no bias) - BN - ReLU - Dropout2d - 1x1 conv (bias)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(mid_channels, classes, kernel_size=1),
    )


def _resize(x: torch.Tensor, height, width) -> torch.Tensor:
    """x bilinearly resized (align_corners=True) to height x width, or x itself when it has that size; a size
    only known at run time (``torch.export`` with dynamic H, W) resizes, which is exact where it is the same."""
    if statically_known_true(x.shape[2] == height) and statically_known_true(x.shape[3] == width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)


class PSPNet(nn.Module):
    """Pyramid Scene Parsing Network (semseg layout).

    Args:
        layers: backbone depth, one of 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck; semseg's).
        classes: number of classes (>= 1), the channels of ``cls.4`` / ``aux.4``.
        bins: pyramid pooling output sizes (validated by ``psp_kernels.geometry.check_bins``);
            ``fea_dim`` (2048, or 512 for 18/34) must be divisible by ``len(bins)``.
        dropout: ``Dropout2d`` probability in both heads, in [0, 1).
        zoom_factor: 1, 2, 4 or 8; output resolution relative to the stride-8 features (see
            :func:`output_size`).
        fused: the default of the three switches below: ``True`` all fused, ``False`` semseg's module math for
            all of them. Same parameters and results either way.
        fused_ppm: the pyramid pooling module runs the fused kernels (:class:`psp_kernels.PyramidPooling`).
        concat_free_head: ``cls.0``-``cls.2`` without the 2C-channel concat (:class:`psp_kernels.PSPHead`).
        fused_backbone: the backbone's conv + BN (+ residual) + ReLU as one op each
            (:func:`psp_kernels.nn.conv.fused_conv_bn`: BN folded into the conv in eval mode, the fused
            training op on GPU). In eval mode on CPU the model then runs channels_last whatever x's layout
            (oneDNN's fast layout; the logits come back in x's).
        criterion: loss ``criterion(logits [N, K, h, w], y [N, h, w]) -> scalar``, applied to the main and
            the aux logits in train mode; default :class:`pspnet.loss.PSPLoss` ``()``: semseg's
            ``nn.CrossEntropyLoss(ignore_index=255)`` (mean over non-ignored pixels), whose ``combine`` weighs
            the aux loss by 0.4. A run builds it from its config (:func:`pspnet.loss.build_criterion`).
        deep_stem: semseg's 3x3 deep stem (default); ``False``: torchvision's 7x7 stem (``layer0`` =
            Sequential(conv1, bn1, relu, maxpool)), for torchvision ImageNet weights.

    Modules (state_dict order and names exactly semseg's; PSPNet-50: 370 entries, PSPNet-101: 676):
        ``layer0`` = Sequential(conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu, maxpool) (one ReLU
        module at 2, 5, 8), ``layer1..layer4`` (layer3 dilated 2, layer4 dilated 4, output stride 8),
        ``ppm`` (``features.{i}.1`` conv [fea_dim/len(bins), fea_dim, 1, 1], ``features.{i}.2`` BN),
        ``cls`` (``cls.0`` [512, 2*fea_dim, 3, 3], ``cls.1`` BN, ``cls.4`` [classes, 512, 1, 1] + bias),
        ``aux`` on layer3 (``aux.0`` [256, aux_in, 3, 3] with aux_in 1024 / 256 for 18/34, ``aux.1`` BN,
        ``aux.4``). No ``fc``/``avgpool``. ``criterion`` holds no state.

    Init: backbone kaiming_normal(fan_out) convs, BN weight 1 / bias 0; ``ppm``, ``cls``, ``aux`` PyTorch
    defaults (as semseg, which then loads ImageNet weights into the backbone: :func:`load_backbone`).

    Raises:
        ValueError: any argument out of range. TypeError: non-int ``layers``/``classes``/``zoom_factor``,
        bad ``bins`` type, non-callable ``criterion``.
    """

    def __init__(self, layers: int = 50, classes: int = 2, bins: Sequence[int] = DEFAULT_BINS,
                 dropout: float = 0.1, zoom_factor: int = 8, fused: bool = True,
                 criterion: Optional[Callable[..., torch.Tensor]] = None, deep_stem: bool = True, *,
                 fused_ppm: Optional[bool] = None, concat_free_head: Optional[bool] = None,
                 fused_backbone: Optional[bool] = None):
        super().__init__()
        # --- validate everything before building the (large) backbone
        for name, value in (("layers", layers), ("classes", classes), ("zoom_factor", zoom_factor)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if layers not in RESNET_BLOCKS:
            raise ValueError(f"layers must be one of {sorted(RESNET_BLOCKS)}, got {layers}")
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        if zoom_factor not in ZOOM_FACTORS:
            raise ValueError(f"zoom_factor must be one of {ZOOM_FACTORS}, got {zoom_factor}")
        bins = check_bins(bins)
        block, _ = RESNET_BLOCKS[layers]
        fea_dim = 512 * block.expansion
        if fea_dim % len(bins) != 0:
            raise ValueError(f"the backbone's {fea_dim} feature channels must be divisible by len(bins); "
                             f"got {len(bins)} bins {bins} for layers={layers}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if criterion is None:
            criterion = PSPLoss()
        elif not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")

        self.layers = layers
        self.classes = classes
        self.bins = bins
        self.dropout = float(dropout)
        self.zoom_factor = zoom_factor
        self.fused_ppm = bool(fused) if fused_ppm is None else bool(fused_ppm)
        self.concat_free_head = bool(fused) if concat_free_head is None else bool(concat_free_head)
        self.fused_backbone = bool(fused) if fused_backbone is None else bool(fused_backbone)
        self.fea_dim = fea_dim
        self.criterion = criterion  # registered first, as in semseg; PSPLoss has no state

        # --- backbone (semseg: ResNet deep_base, stem re-wrapped as layer0, then dilation surgery)
        self.deep_stem = bool(deep_stem)
        resnet = ResNet(block, RESNET_BLOCKS[layers][1], num_classes=None, deep_base=self.deep_stem,
                        fused=self.fused_backbone)
        stem = [resnet.conv1, resnet.bn1, resnet.relu]
        if self.deep_stem:
            stem += [resnet.conv2, resnet.bn2, resnet.relu, resnet.conv3, resnet.bn3, resnet.relu]
        self.layer0 = nn.Sequential(*stem, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        dilate_layer(self.layer3, 2)
        dilate_layer(self.layer4, 4)

        # --- heads: the PSPHead's modules, registered under semseg's names (``ppm.*``, ``cls.0``-``cls.4``)
        head = PSPHead(fea_dim, fea_dim // len(bins), 512, bins, fused_ppm=self.fused_ppm,
                       concat_free=self.concat_free_head, classes=classes, dropout=dropout)
        self.ppm, self.cls = head.ppm, head.cls
        aux_in = 256 * block.expansion
        self.aux = _aux_head(aux_in, 256, classes, dropout)

    def _check_inputs(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape [N, 3, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        n, _, hgt, wid = x.shape
        if n < 1 or hgt < 1 or wid < 1:
            raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
        if self.training and n * min(self.bins) ** 2 < 2:
            raise ValueError(f"x has batch size {n}: in train mode BatchNorm after the {min(self.bins)}x"
                             f"{min(self.bins)} pyramid bin needs more than one value per channel; use a batch "
                             f"size >= 2 or eval mode")
        if y is None:
            return None
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        expected = (n, *output_size(hgt, wid, self.zoom_factor))
        if tuple(y.shape) != expected:
            raise ValueError(f"y must have shape [N, h, w] = {list(expected)} for x of shape {list(x.shape)} "
                             f"and zoom_factor={self.zoom_factor}, got {list(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class indices, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        return y.long()

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """Segment a batch.

        Args:
            x: float [N, 3, H, W] (any H, W >= 1; semseg requires ``8k + 1``). fp16/bf16/fp32/fp64,
                same dtype as the parameters.
            y: optional int labels [N, h, w] with ``(h, w) = output_size(H, W, zoom_factor)``; 255 is
                ignored by the default criterion. Only used in train mode; any integer dtype (cast to long).

        Returns:
            train mode with ``y``: ``(pred, main_loss, aux_loss)``: pred int64 [N, h, w] (argmax of the
            main logits), the two scalar losses of the logits upsampled to (h, w) (bilinear,
            align_corners=True) against ``y``, i.e. at full resolution. With a :class:`~pspnet.loss.PSPLoss`
            criterion the total to back-propagate is ``self.criterion.combine(main_loss, aux_loss).total``
            (``main_loss + aux_weight * aux_loss``).
            otherwise: logits [N, classes, h, w] in x's dtype and memory format (the aux head is not run).

        Raises:
            ValueError: ``x`` not [N, 3, H, W]; ``y`` of the wrong shape or device; train mode with a
                single value per channel in the 1x1 bin (N == 1).
            TypeError: ``x`` not floating point; ``y`` not integer.
        """
        y = self._check_inputs(x, y)
        h, w = output_size(x.shape[2], x.shape[3], self.zoom_factor)

        layout = memory_format(is_channels_last(x))
        if self.fused_backbone and not self.training and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout for the folded convs
        x = fused_conv_bn_sequence(self.layer0, x) if self.fused_backbone else self.layer0(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x_tmp = self.layer3(x)
        x = psp_head(self.layer4(x_tmp), self.ppm, self.cls, self.concat_free_head).contiguous(memory_format=layout)
        x = _resize(x, h, w)

        if self.training and y is not None:
            aux = _resize(self.aux(x_tmp), h, w)
            main_loss = self.criterion(x, y)
            aux_loss = self.criterion(aux, y)
            return x.max(1)[1], main_loss, aux_loss
        return x

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, classes={self.classes}, bins={self.bins}, zoom_factor={self.zoom_factor}, "
                f"fused_ppm={self.fused_ppm}, concat_free_head={self.concat_free_head}, "
                f"fused_backbone={self.fused_backbone}")


class LoadResult(NamedTuple):
    """Keys not loaded by :func:`load_state_dict` (always empty when ``strict=True``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


_MODULE_PREFIX = "module."
_SHOW = 10


def _extract_state_dict(state: Any) -> dict[str, torch.Tensor]:
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state_dict, a checkpoint dict or a path, got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # semseg checkpoint {'epoch', 'state_dict', 'optimizer'}
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        name = key[len(_MODULE_PREFIX):] if key.startswith(_MODULE_PREFIX) else key
        if name in out:
            raise RuntimeError(f"state_dict has key {name!r} both with and without the 'module.' prefix")
        out[name] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"  {title} ({len(items)}): {shown}{more}"


def load_state_dict(model: nn.Module, state: Union[Mapping[str, Any], str, os.PathLike],
                    strict: bool = True) -> LoadResult:
    """Load semseg (or our own) weights into ``model`` (in place), checking keys and shapes first.

    Args:
        model: usually a :class:`PSPNet` (any ``nn.Module`` works).
        state: a semseg checkpoint ``{'epoch', 'state_dict', 'optimizer'}`` (keys ``module.``-prefixed, as
            saved from DDP by semseg ``tool/train.py``), a plain state_dict with or without the ``module.``
            prefix, or a path to either (loaded on CPU with ``weights_only=True``). Values are copied into
            the model's tensors (dtype/device converted by ``copy_``).
        strict: True: the keys must match exactly (``num_batches_tracked`` may be absent, as in
            pre-0.4.1 checkpoints; BatchNorm then keeps a default). False: load the intersection, like
            semseg ``tool/test.py`` (``strict=False``).

    Returns:
        :class:`LoadResult` ``(missing_keys, unexpected_keys)``.

    Raises:
        RuntimeError: (before touching the model) when ``strict`` and keys are missing or unexpected, or
            whenever a shared key has a different shape; the message lists the first 10 of each kind.
        TypeError: ``state`` is not a mapping or path.
    """
    return _load_checked(model, _extract_state_dict(state), model.state_dict(), strict)


def _load_checked(model: nn.Module, sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                  strict: bool) -> LoadResult:
    """Load ``sd`` into the entries ``own`` of model's state_dict after checking keys and shapes."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # BatchNorm fills a missing num_batches_tracked itself (old checkpoints); not an error
    tolerated = [k for k in missing if k.endswith(".num_batches_tracked")
                 and k[: -len("num_batches_tracked")] + "running_mean" in sd]
    missing_hard = [k for k in missing if k not in tolerated]
    mismatched = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(v.shape)}"
                  for k, v in own.items() if k in sd and isinstance(sd[k], torch.Tensor)
                  and tuple(sd[k].shape) != tuple(v.shape)]
    not_tensors = [k for k in own if k in sd and not isinstance(sd[k], torch.Tensor)]
    problems = []
    if strict and missing_hard:
        problems.append(_listing("missing keys", missing_hard))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if not_tensors:
        problems.append(_listing("values that are not tensors", not_tensors))
    if problems:
        raise RuntimeError(f"cannot load state_dict into {type(model).__name__}:\n" + "\n".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


_DEEP_STEM = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4", "conv3": "layer0.6",
              "bn3": "layer0.7"}


def load_backbone(model: "PSPNet", state: Union[Mapping[str, Any], str, os.PathLike]) -> LoadResult:
    """Initialise ``model``'s backbone (``layer0``-``layer4``) from ImageNet ResNet weights, in place.

    Args:
        model: a :class:`PSPNet`; ``model.deep_stem`` picks the format. ``True``: semseg's deep-stem
            ResNet (``initmodel/resnet50_v2.pth``: ``conv1/bn1/conv2/bn2/conv3/bn3``, ``layer1``-``layer4``,
            ``fc``); ``False``: torchvision's ResNet (7x7 ``conv1``/``bn1``, ``layer1``-``layer4``, ``fc``).
        state: a state_dict, a checkpoint dict holding one (``state_dict`` key), or a path (loaded on CPU
            with ``weights_only=True``); a ``module.`` prefix is stripped. ``fc.*`` is ignored.

    Returns:
        :class:`LoadResult` (both lists empty: every backbone tensor was loaded).

    Raises:
        RuntimeError: (before touching the model) a backbone key missing from the file, a key the backbone
            does not have (e.g. a deep-stem file into ``deep_stem=False``), or a shape mismatch; the message
            lists the first 10 of each.
    """
    stem = _DEEP_STEM if model.deep_stem else {k: _DEEP_STEM[k] for k in ("conv1", "bn1")}
    mapped = {}
    for key, value in _extract_state_dict(state).items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        mapped[f"{stem[head]}.{rest}" if head in stem else key] = value
    own = {k: v for k, v in model.state_dict().items() if k.partition(".")[0] in
           ("layer0", "layer1", "layer2", "layer3", "layer4")}
    return _load_checked(model, mapped, own, strict=True)
