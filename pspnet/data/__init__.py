"""Data loading and augmentation for PSPNet.

:class:`CamVid` reads the SegNet 11-class CamVid copy (``classes.json``, one folder per split); :class:`ADE20K`,
:class:`VOC2012` (with SBD), :class:`Cityscapes` and :class:`ImageFolderSegmentation` read those datasets in
their own layouts (:mod:`pspnet.data.datasets`); :func:`open_dataset` opens the one a config's ``dataset`` key
names (:mod:`pspnet.data.registry`, where :func:`register_dataset` adds a layout); the transforms reproduce
semseg ``util/transform.py`` (see :mod:`pspnet.data.transforms`).  Typical use::

    train = CamVid(root, "train", transform=train_transform((361, 481)), cache=True)
    loader = DataLoader(train, batch_size=8, shuffle=True, drop_last=True,
                        num_workers=1, worker_init_fn=seed_worker)
"""

from .camvid import CamVid
from .datasets import ADE20K, VOC2012, Cityscapes, ImageFolderSegmentation
from .registry import dataset_names, open_dataset, register_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Crop,
    Normalize,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandRotate,
    RandScale,
    Resize,
    ToTensor,
    seed_worker,
    train_transform,
    val_transform,
)

__all__ = [
    "ADE20K",
    "CamVid",
    "Cityscapes",
    "ImageFolderSegmentation",
    "VOC2012",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Crop",
    "Normalize",
    "RandomGaussianBlur",
    "RandomHorizontalFlip",
    "RandRotate",
    "RandScale",
    "Resize",
    "ToTensor",
    "seed_worker",
    "train_transform",
    "val_transform",
    "dataset_names",
    "open_dataset",
    "register_dataset",
]
