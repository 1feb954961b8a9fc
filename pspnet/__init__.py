"""pspnet: PSPNet (dilated ResNet + fused pyramid pooling), its datasets, trainer and evaluation.

Entry points: ``python -m pspnet.train``, ``python -m pspnet.evaluate``, ``python -m pspnet.predict``.
The model is :class:`PSPNet` (:mod:`pspnet.models`, with checkpoint loading), its loss :mod:`pspnet.loss`,
datasets and OpenCV transforms :mod:`pspnet.data`, the run's recipe :mod:`pspnet.config`.
"""

from .models import PSPNet

__all__ = ["PSPNet"]
