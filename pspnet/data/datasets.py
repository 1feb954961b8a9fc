"""The paper's datasets in their own on-disk layouts, and a generic image / label folder.

Each class is ``Name(root, split, transform=None)`` with ``root`` the dataset's own top folder; item i is
``(image, label)``: ``image`` a ``np.uint8`` RGB array H x W x 3 and ``label`` a ``np.uint8`` array H x W
of class indices with 255 = ignore (``transform(np.float32(image), label)`` when a transform is given,
as :class:`pspnet.data.CamVid` and semseg ``util/dataset.py``). Label conventions follow semseg's
prepared lists:

- :class:`ADE20K` (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` with 0 = "other" and 1..150 the classes; the label is
  ``label - 1`` with 0 -> 255 (150 classes).
- :class:`VOC2012` with the SBD augmentation (semseg's ``voc2012`` folder): ``JPEGImages/*.jpg``,
  ``SegmentationClassAug/*.png`` (0..20, 255 = border) and the list files ``list/train_aug.txt`` /
  ``list/val.txt`` of "image label" path pairs relative to root (21 classes).
- :class:`Cityscapes`: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; labelIds map to the 19 trainIds, all others to 255.
- :class:`ImageFolderSegmentation`: ``<split>/images/*`` (png/jpg) and ``<split>/labels/*.png`` paired by
  file stem, labels already class indices (``num_classes`` given, or inferred from ``classes.txt``).

A missing folder, list file or partner file raises ``FileNotFoundError`` naming it at construction;
reading a corrupt file raises ``RuntimeError`` naming it, a label of the wrong size or with values
outside the classes ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch.utils.data

__all__ = ["ADE20K", "VOC2012", "Cityscapes", "ImageFolderSegmentation", "SegmentationFolder", "read_rgb",
           "read_pair", "voc_palette"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def voc_palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3]: PASCAL VOC's bit-interleaved colour map (class 0 black)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, shift = k, 7
        while c:
            for channel in range(3):
                palette[k, channel] |= ((c >> channel) & 1) << shift
            c >>= 3
            shift -= 1
    return palette


def read_rgb(path) -> np.ndarray:
    """Decode an image file as uint8 RGB [H, W, 3] (grey and alpha images are converted).

    Raises:
        RuntimeError: OpenCV cannot decode the file (missing, corrupt or truncated); the message names it.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"cannot decode image {path} (missing, corrupt or truncated)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_pair(image_path: str, label_path: str, num_classes: int, label_lut: Optional[np.ndarray] = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Decode one item: (uint8 RGB H x W x 3, uint8 H x W labels mapped through ``label_lut``).

    Raises:
        RuntimeError: OpenCV cannot decode a file (missing, corrupt or truncated); the message names it.
        ValueError: a label that is not single-channel 8-bit, differs from the image in size, or holds
            values other than 0..num_classes-1 and 255 (after the mapping); the message names the file.
    """
    image = read_rgb(image_path)
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise RuntimeError(f"cannot decode label {label_path} (missing, corrupt or truncated)")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label {label_path} must be a single-channel 8-bit image H x W, got shape {label.shape} "
                         f"{label.dtype}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label {label_path} has size {label.shape} but image {image_path} has size "
                         f"{image.shape[:2]} (H, W)")
    if label_lut is not None:
        label = label_lut[label]
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"label {label_path} has values {np.unique(label[bad]).tolist()[:10]} outside "
                         f"0..{num_classes - 1} and {IGNORE_INDEX}")
    return image, label


def _label_lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


class SegmentationFolder(torch.utils.data.Dataset):
    """Base of the dataset classes: a list of (image path, label path) pairs, decoded with OpenCV and
    mapped to class indices by a 256-entry lookup table (``label_lut``; identity by default).

    Attributes: ``classes`` (names), ``palette`` (uint8 [K, 3]), ``num_classes``, ``ignore_index`` (255),
    ``root``, ``split``, ``files``, ``names`` (file stems).
    """

    ignore_index = IGNORE_INDEX
    label_lut: Optional[np.ndarray] = None

    def __init__(self, root, split: str, transform: Optional[Callable] = None, *, splits: Sequence[str],
                 classes: Sequence[str], palette: Optional[np.ndarray] = None):
        if split not in splits:
            raise ValueError(f"split must be one of {tuple(splits)}, got split={split!r}")
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__} root folder not found: {self.root}")
        self.split = split
        self.transform = transform
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.palette = voc_palette(self.num_classes) if palette is None else palette
        self.files = self._pair_files()
        if not self.files:
            raise FileNotFoundError(f"no images found for split {split!r} under {self.root}")
        self.names = [Path(image).stem for image, _ in self.files]

    def _pair_files(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_pair(*self.files[index], self.num_classes, self.label_lut)

    def label(self, index: int) -> np.ndarray:
        """uint8 [H, W] class indices of item ``index`` (255 = ignore), untransformed."""
        return self._load(index)[1]

    def __getitem__(self, index: int):
        image, label = self._load(index)
        if self.transform is None:
            return image, label
        return self.transform(np.float32(image), label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def _pair_by_stem(image_dir: Path, label_dir: Path, image_glob: str, label_name: Callable[[str], str]
                  ) -> list[tuple[str, str]]:
    """Pair every image with the label ``label_dir / label_name(image stem)``; a missing label raises."""
    pairs = []
    for image in sorted(image_dir.glob(image_glob)):
        label = label_dir / label_name(image.stem)
        if not label.is_file():
            raise FileNotFoundError(f"label {label} not found (needed for {image})")
        pairs.append((str(image), str(label)))
    return pairs


class ADE20K(SegmentationFolder):
    """ADE20K scene parsing (MIT SceneParsing, ``ADEChallengeData2016``), 150 classes.

    Args:
        root: the ``ADEChallengeData2016`` folder; split: ``"train"`` or ``"val"``; transform: as CamVid.
    Labels: stored 0 ("other") .. 150 become 255, 0..149 (semseg's ``label - 1`` lists, mmseg's
    ``reduce_zero_label``). Class names come from ``objectInfo150.txt`` / ``.csv`` when present (its
    ``Name`` column), else ``class_1`` ... ``class_150``.
    """

    label_lut = _label_lut({v: v - 1 for v in range(1, 151)})

    def __init__(self, root, split: str, transform: Optional[Callable] = None):
        super().__init__(root, split, transform, splits=("train", "val"), classes=_ade_names(Path(root)))

    def _pair_files(self):
        sub = {"train": "training", "val": "validation"}[self.split]
        return _pair_by_stem(_require_dir(self.root / "images" / sub, "ADE20K images"),
                             _require_dir(self.root / "annotations" / sub, "ADE20K annotations"), "*.jpg",
                             lambda stem: stem + ".png")


def _ade_names(root: Path) -> list[str]:
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if path.is_file():
            rows = [line.replace(",", "\t").split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
            names = [row[-1].strip().split(";")[0] for row in rows]
            if len(names) == 150:
                return names
    return [f"class_{k}" for k in range(1, 151)]


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class VOC2012(SegmentationFolder):
    """PASCAL VOC 2012 with the SBD augmentation (10582 train_aug / 1449 val images), 21 classes.

    Args:
        root: semseg's ``voc2012`` folder holding ``JPEGImages``, ``SegmentationClassAug`` and the lists
            ``list/train_aug.txt`` (split ``"train"``) and ``list/val.txt`` (split ``"val"``), each line
            "image label" relative to root (semseg's ``tool/`` list format).
    Labels: 0..20 as stored, 255 (object borders) ignored.
    """

    def __init__(self, root, split: str, transform: Optional[Callable] = None):
        super().__init__(root, split, transform, splits=("train", "val"), classes=VOC_CLASSES)

    def _pair_files(self):
        lst = self.root / "list" / {"train": "train_aug.txt", "val": "val.txt"}[self.split]
        return _read_list(self.root, lst)


def _read_list(root: Path, lst: Path) -> list[tuple[str, str]]:
    """semseg's list file: "image label" per line, paths relative to root; both files must exist."""
    if not lst.is_file():
        raise FileNotFoundError(f"list file not found: {lst}")
    pairs = []
    for number, line in enumerate(lst.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {number} of {lst} must be 'image label', got {line!r}")
        image, label = (root / p.lstrip("/") for p in parts)
        for path in (image, label):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (line {number} of {lst})")
        pairs.append((str(image), str(label)))
    return pairs


CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


class Cityscapes(SegmentationFolder):
    """Cityscapes fine annotations, the 19 evaluation classes.

    Args:
        root: the Cityscapes folder holding ``leftImg8bit`` and ``gtFine``; split: ``"train"``, ``"val"``
            or ``"test"``.
    Labels: ``*_gtFine_labelIds.png`` mapped to trainIds 0..18 (road = labelId 7, ..., bicycle = 33, as
    cityscapesScripts' ``labels.py``); every other labelId becomes 255.
    """

    label_lut = _label_lut({label_id: k for k, label_id in enumerate(CITYSCAPES_LABEL_IDS)})

    def __init__(self, root, split: str, transform: Optional[Callable] = None):
        super().__init__(root, split, transform, splits=("train", "val", "test"), classes=CITYSCAPES_CLASSES,
                         palette=CITYSCAPES_PALETTE)

    def _pair_files(self):
        images = _require_dir(self.root / "leftImg8bit" / self.split, "Cityscapes leftImg8bit")
        labels = _require_dir(self.root / "gtFine" / self.split, "Cityscapes gtFine")
        pairs = []
        for city in sorted(p for p in images.iterdir() if p.is_dir()):
            pairs += _pair_by_stem(city, labels / city.name, "*_leftImg8bit.png",
                                   lambda stem: stem[:-len("leftImg8bit")] + "gtFine_labelIds.png")
        return pairs


class ImageFolderSegmentation(SegmentationFolder):
    """Any dataset laid out as ``root/<split>/images/<name>.{png,jpg,jpeg}`` and
    ``root/<split>/labels/<name>.png`` (class indices, 255 = ignore).

    Args:
        root, split (any folder name under root), transform: as the others.
        num_classes: the number of classes; default: the lines of ``root/classes.txt`` (one name each).
    Raises:
        ValueError: neither ``num_classes`` nor ``classes.txt``.
    """

    def __init__(self, root, split: str, transform: Optional[Callable] = None, num_classes: Optional[int] = None):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"ImageFolderSegmentation root folder not found: {Path(root).absolute()}")
        names_file = Path(root) / "classes.txt"
        if num_classes is not None:
            classes = [f"class_{k}" for k in range(num_classes)]
        elif names_file.is_file():
            classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        else:
            raise ValueError(f"ImageFolderSegmentation needs num_classes or a class list {names_file}")
        splits = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        super().__init__(root, split, transform, splits=splits, classes=classes)

    def _pair_files(self):
        images = _require_dir(self.root / self.split / "images", "images")
        labels = _require_dir(self.root / self.split / "labels", "labels")
        pairs = []
        for suffix in IMAGE_SUFFIXES:
            pairs += _pair_by_stem(images, labels, f"*{suffix}", lambda stem: stem + ".png")
        return sorted(pairs)
