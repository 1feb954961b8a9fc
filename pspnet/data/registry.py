"""The datasets a config's ``dataset`` key can name: one registry that config validation, the trainer and
``pspnet.evaluate`` / ``pspnet.predict`` all read.

Every entry is a dataset class called as ``cls(root, split, transform, **options)``, where ``options`` are
those of :func:`open_dataset`'s keyword options the class takes (``cache``: keep decoded items in memory;
``num_classes``: the class count of a layout that does not fix it). Built in: ``camvid``
(:class:`~pspnet.data.CamVid`), ``ade20k``, ``voc2012``, ``cityscapes`` and ``folder``
(:mod:`pspnet.data.datasets`). :func:`register_dataset` adds a layout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

from torch.utils.data import Dataset

from .camvid import CamVid
from .datasets import ADE20K, VOC2012, Cityscapes, ImageFolderSegmentation

__all__ = ["OPTIONS", "register_dataset", "dataset_names", "open_dataset"]

OPTIONS = ("cache", "num_classes")
"""The keyword options :func:`open_dataset` passes to the classes that take them."""


class _Entry(NamedTuple):
    cls: Callable[..., Dataset]
    options: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, cls: Callable[..., Dataset], options: Sequence[str] = ()) -> None:
    """Make ``cls`` the dataset of config ``dataset: name``.

    Args:
        name: the config value (lower case by convention).
        cls: ``cls(root, split, transform, **options) -> Dataset`` of ``(image, label)`` items as
            :class:`pspnet.data.CamVid` (uint8 RGB H x W x 3, uint8 labels H x W with 255 = ignore;
            ``transform(np.float32(image), label)`` when a transform is given), with ``classes``,
            ``palette`` and ``num_classes`` attributes.
        options: which of :data:`OPTIONS` ``cls`` takes as keyword arguments.
    Raises:
        ValueError: ``name`` is empty or already registered, or an option is not one of :data:`OPTIONS`.
        TypeError: ``cls`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"dataset '{name}' is already registered ({_REGISTRY[name].cls.__name__})")
    if not callable(cls):
        raise TypeError(f"cls must be callable, got {type(cls).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options must be among {OPTIONS}, got {unknown}")
    _REGISTRY[name] = _Entry(cls, tuple(options))


def dataset_names() -> tuple[str, ...]:
    """The registered names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def open_dataset(name: str, root, split: str, transform: Optional[Callable] = None, *, cache: bool = False,
                 num_classes: Optional[int] = None) -> Dataset:
    """The dataset ``name`` at ``root``, split ``split``: the config's ``dataset`` key.

    Args:
        name: a registered name (:func:`dataset_names`).
        root, split, transform: passed to the class.
        cache: keep decoded items in memory (CamVid).
        num_classes: the class count of the ``folder`` layout (default: its ``classes.txt``).
    Raises:
        ValueError: an unknown ``name``; and whatever the class raises (missing folders: FileNotFoundError).
    """
    if name not in _REGISTRY:
        raise ValueError(f"dataset must be one of {dataset_names()}, got {name!r}")
    entry = _REGISTRY[name]
    given = {"cache": cache, "num_classes": num_classes}
    return entry.cls(root, split, transform, **{key: given[key] for key in entry.options})


register_dataset("camvid", CamVid, ("cache",))
register_dataset("ade20k", ADE20K)
register_dataset("voc2012", VOC2012)
register_dataset("cityscapes", Cityscapes)
register_dataset("folder", ImageFolderSegmentation, ("num_classes",))
