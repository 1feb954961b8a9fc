"""Dilated ResNet backbone with semseg's deep stem.

Exactly the module structure (and therefore the state_dict key names) of hszhao/semseg
``model/resnet.py``: a 3-conv "deep base" stem ``conv1(3->64, s2) / bn1 / relu / conv2(64->64) / bn2 /
relu / conv3(64->128) / bn3 / relu / maxpool(3, 2, 1)`` (so ``inplanes = 128`` and ``layer1.0.downsample``
maps 128 -> 256), ``Bottleneck`` blocks with the stride on the 3x3 conv ("ResNet v1.5"), all convs without
bias, kaiming_normal(fan_out) conv init and BN gamma 1 / beta 0.

The output-stride-8 "dilation surgery" that semseg's ``PSPNet.__init__`` applies to ``layer3`` / ``layer4``
lives here as :func:`dilate_layer` (PSPNet calls it). References: Zhao et al., "Pyramid Scene Parsing
Network", CVPR 2017, Sec. 3.2-3.3 (dilated ResNet, output stride 8); He et al., CVPR 2016.

Differences from semseg, all outside what PSPNet uses: no ``pretrained`` argument (load weights with
:func:`pspnet.models.load_state_dict` or ``torch.load``); ``avgpool`` is ``AdaptiveAvgPool2d(1)`` instead of
``AvgPool2d(7)`` (identical at 224x224, parameter-free either way); ``num_classes=None`` drops the
``avgpool``/``fc`` classifier entirely.
"""

from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
import torch.nn as nn
from psp_kernels.nn.conv import fused_conv_bn, fused_conv_bn_sequence

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "dilate_layer",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "RESNET_BLOCKS",
]

#: Blocks per stage for each depth: ``depth -> (block class, (n1, n2, n3, n4))``.
RESNET_BLOCKS: dict = {}  # filled below, once the block classes exist


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (semseg ``conv3x3``)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity shortcut (ResNet-18/34), ``expansion = 1``; semseg ``BasicBlock``.

    ``conv1`` carries the stride. Forward: x [N, inplanes, H, W] -> [N, planes, H', W'] with
    ``H' = (H - 1) // stride + 1``; same dtype/device as x.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` (and of ``downsample``, which the caller builds).
        downsample: module applied to x for the residual when shapes differ, or None.
        fused: run each conv + BN (+ residual) + ReLU through :func:`psp_kernels.nn.conv.fused_conv_bn`: one op
            with BN folded into the conv in eval mode, the fused training op in training on a GPU, the modules
            otherwise.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            residual = x if self.downsample is None else fused_conv_bn_sequence(self.downsample, x)
            return fused_conv_bn(fused_conv_bn(x, self.conv1, self.bn1), self.conv2, self.bn2, residual=residual)
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50/101/152), ``expansion = 4``; semseg ``Bottleneck``.

    The stride sits on the 3x3 ``conv2`` ("v1.5"). Forward: x [N, inplanes, H, W] ->
    [N, 4 * planes, H', W'] with ``H' = (H - 1) // stride + 1``; same dtype/device as x.

    Args:
        inplanes: input channels.
        planes: bottleneck width (output channels are ``4 * planes``).
        stride: stride of ``conv2`` (and of ``downsample``, which the caller builds).
        downsample: module applied to x for the residual when shapes differ, or None.
        fused: as for :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            residual = x if self.downsample is None else fused_conv_bn_sequence(self.downsample, x)
            out = fused_conv_bn(fused_conv_bn(x, self.conv1, self.bn1), self.conv2, self.bn2)
            return fused_conv_bn(out, self.conv3, self.bn3, residual=residual)
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """semseg's ResNet (``model/resnet.py``), deep stem by default.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in ``layer1..layer4`` (4 ints >= 1).
        deep_base: True (semseg/PSPNet): 3x3 stem ``conv1/bn1/conv2/bn2/conv3/bn3`` ending at 128
            channels. False: the torchvision 7x7 ``conv1/bn1`` stem ending at 64 channels.
        fused: blocks and stem run each conv + BN (+ residual) + ReLU through
            :func:`psp_kernels.nn.conv.fused_conv_bn` (see :class:`BasicBlock`).
        num_classes: size of the ``fc`` classifier (semseg: 1000), or None for no ``avgpool``/``fc``
            (forward then returns the ``layer4`` feature map).

    Attributes: ``conv1, bn1, [conv2, bn2, conv3, bn3,] relu, maxpool, layer1..layer4[, avgpool, fc]``,
    named as in semseg so PSPNet can assemble ``layer0`` from them.

    Forward: x float [N, 3, H, W] -> logits [N, num_classes], or features
    [N, 512 * expansion, H / 32, W / 32] (before any dilation surgery) when ``num_classes`` is None.

    Raises:
        ValueError: bad ``block``, ``layers`` or ``num_classes``.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: Optional[int] = 1000,
                 deep_base: bool = True, fused: bool = False):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        layers = tuple(layers)
        if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 ints >= 1, got {layers!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be an int >= 1 or None, got {num_classes!r}")
        self.block = block
        self.deep_base = bool(deep_base)
        self.fused = bool(fused)
        if self.deep_base:
            self.inplanes = 128
            self.conv1 = conv3x3(3, 64, stride=2)
            self.bn1 = nn.BatchNorm2d(64)
            self.conv2 = conv3x3(64, 64)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = conv3x3(64, 128)
            self.bn3 = nn.BatchNorm2d(128)
        else:
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        else:
            self.avgpool = None
            self.fc = None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, fused=self.fused)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            mods.append(block(self.inplanes, planes, fused=self.fused))
        return nn.Sequential(*mods)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Stem incl. maxpool: [N, 3, H, W] -> [N, 128 (deep) or 64, H/4, W/4]."""
        if self.fused:
            x = fused_conv_bn(x, self.conv1, self.bn1)
            if self.deep_base:
                x = fused_conv_bn(fused_conv_bn(x, self.conv2, self.bn2), self.conv3, self.bn3)
            return self.maxpool(x)
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_base:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.fc is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dilate_layer(layer: nn.Sequential, dilation: int) -> nn.Sequential:
    """semseg's dilation surgery on one ResNet stage, in place; returns ``layer``.

    Bottleneck stages (exactly semseg ``PSPNet.__init__``): every block's ``conv2`` (the 3x3) gets
    ``dilation = padding = (d, d)``, ``stride = (1, 1)``; ``downsample.0`` gets ``stride = (1, 1)``. All
    blocks, including block 0 (no "contract dilation" as in mmseg/CSAIL).

    BasicBlock stages (ResNet-18/34; semseg's PSPNet does not support them, so this is our choice):
    BasicBlock carries the stride on ``conv1``, so both 3x3 convs ``conv1`` and ``conv2`` get
    ``dilation = padding = (d, d)``, ``stride = (1, 1)``, and ``downsample.0`` ``stride = (1, 1)``. This
    keeps output stride 8 and dilates every 3x3 conv of the stage, the analogue of the Bottleneck rule
    (where the 3x3 conv is the only spatial conv). Applying semseg's name rule literally (``conv2``
    only) would leave ``conv1`` strided and the output stride at 32.

    Args:
        layer: ``resnet.layer3`` or ``resnet.layer4`` (an ``nn.Sequential`` of blocks).
        dilation: d >= 1 (semseg: 2 for layer3, 4 for layer4).

    Raises:
        ValueError: d < 1. TypeError: a block is neither BasicBlock nor Bottleneck.
    """
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    d = (dilation, dilation)
    for blk in layer:
        if isinstance(blk, Bottleneck):
            convs = [blk.conv2]
        elif isinstance(blk, BasicBlock):
            convs = [blk.conv1, blk.conv2]
        else:
            raise TypeError(f"dilate_layer expects BasicBlock/Bottleneck blocks, got {type(blk).__name__}")
        for conv in convs:
            conv.dilation, conv.padding, conv.stride = d, d, (1, 1)
        if blk.downsample is not None:
            blk.downsample[0].stride = (1, 1)
        blk.stride = 1
    return layer


RESNET_BLOCKS.update({
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
})


def _build(depth: int, deep_base: bool, num_classes: Optional[int]) -> ResNet:
    block, layers = RESNET_BLOCKS[depth]
    return ResNet(block, layers, num_classes=num_classes, deep_base=deep_base)


def resnet18(*, deep_base: bool = True, num_classes: Optional[int] = 1000) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); deep stem by default. Randomly initialised."""
    return _build(18, deep_base, num_classes)


def resnet34(*, deep_base: bool = True, num_classes: Optional[int] = 1000) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); deep stem by default. Randomly initialised."""
    return _build(34, deep_base, num_classes)


def resnet50(*, deep_base: bool = True, num_classes: Optional[int] = 1000) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); deep stem by default. Randomly initialised.

    semseg initialises from its own ``initmodel/resnet50_v2.pth`` (deep stem; not torchvision-compatible).
    """
    return _build(50, deep_base, num_classes)


def resnet101(*, deep_base: bool = True, num_classes: Optional[int] = 1000) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); deep stem by default. Randomly initialised."""
    return _build(101, deep_base, num_classes)


def resnet152(*, deep_base: bool = True, num_classes: Optional[int] = 1000) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); deep stem by default. Randomly initialised."""
    return _build(152, deep_base, num_classes)
