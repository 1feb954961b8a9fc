"""PSPNet models: semseg's dilated deep-stem ResNet backbones and PSPNet (hszhao/semseg ``model/``).

- :class:`PSPNet` (``pspnet.py``): backbone + :class:`psp_kernels.PyramidPooling` + cls/aux heads + loss.
- :func:`load_state_dict`: loads semseg checkpoints (``module.`` prefix stripped) with key/shape checks.
- :func:`load_backbone`: ImageNet initialisation of the backbone (semseg's deep-stem or torchvision format).
- :class:`ResNet`, :class:`BasicBlock`, :class:`Bottleneck`, ``resnet18/34/50/101/152`` (``resnet.py``).
"""

from .pspnet import LoadResult, PSPNet, load_backbone, load_state_dict, output_size
from .resnet import (BasicBlock, Bottleneck, ResNet, dilate_layer, resnet18, resnet34, resnet50, resnet101,
                     resnet152)

__all__ = [
    "BasicBlock", "Bottleneck", "LoadResult", "PSPNet", "ResNet", "dilate_layer", "load_backbone", "load_state_dict",
    "output_size", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
]
