"""pspnet: PSPNet (dilated ResNet + fused pyramid pooling), CamVid data, trainer and evaluation.

Entry points: ``python -m pspnet.train``, ``python -m pspnet.evaluate``. The model lives in
:mod:`pspnet.models`, datasets and OpenCV transforms in :mod:`pspnet.data`.
"""
