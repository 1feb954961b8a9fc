"""CamVid (SegNet 11-class version) as a ``torch.utils.data.Dataset``.

Layout::

    root/classes.json            [{"id", "name", "color": [r, g, b]}, ...], ids 0..K-1
    root/manifest.sha256         "<sha256>  <relative path>" lines (``sha256sum -c`` format)
    root/<split>/images/*.png    RGB, 480 x 360 (W x H)
    root/<split>/labels/*.png    8-bit grayscale, same names; 0..K-1 classes, 255 = void

Items follow semseg ``util/dataset.py`` (``SemData``): the image is read
with OpenCV, converted BGR -> RGB and handed to the transform as float32
(0..255); the label is read as a single-channel array.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch.utils.data

from .datasets import read_pair

__all__ = ["CamVid"]

SPLITS = ("train", "val", "test")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` file into ``{relative path: hex digest}``.

    Raises:
        FileNotFoundError: the manifest is missing.
        ValueError: a malformed line (message names the manifest and line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name  # text / binary marker
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"malformed line {number} in {path}: {line!r}")
        entries[name] = digest.lower()
    return entries


def _read_classes(path: Path) -> tuple[list[str], np.ndarray]:
    """Read ``classes.json`` -> (names in id order, uint8 [K, 3] RGB palette).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: invalid JSON, ids not exactly 0..K-1, or a bad color
            (message names the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"classes file not found: {path}")
    try:
        entries = sorted(json.loads(path.read_text()), key=lambda e: e["id"])
        names = [str(e["name"]) for e in entries]
        colors = [list(e["color"]) for e in entries]
        ids = [e["id"] for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"invalid classes file {path}: {err}") from err
    if ids != list(range(len(ids))) or not ids:
        raise ValueError(f"class ids in {path} must be 0..K-1, got {ids}")
    if not all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors):
        raise ValueError(f"every color in {path} must be 3 ints in 0..255")
    return names, np.array(colors, dtype=np.uint8)


class CamVid(torch.utils.data.Dataset):
    """CamVid split as (image, label) pairs.

    Args:
        root: the camvid folder (holding ``classes.json``, ``manifest.sha256``
            and one folder per split), the config's ``data_root``.
        split: ``"train"``, ``"val"`` or ``"test"`` (the last only if
            ``root/test`` exists).
        transform: optional callable ``(image float32 H x W x 3, label uint8
            H x W) -> anything``, e.g. :func:`pspnet.data.train_transform`.
        verify: if True, check ``classes.json`` and every file of the split
            against ``manifest.sha256`` (about 1 s for the whole dataset).
        cache: if True, keep decoded uint8 arrays in memory after the first
            read (about 0.69 MB per item: ~254 MB for train, ~70 MB for val).
            Each DataLoader worker process holds its own cache unless
            :meth:`preload` is called before the workers are started.

    Items (``dataset[i]``):
        * ``transform is None``: ``(image, label)`` with ``image`` a
          ``np.uint8`` RGB array ``H x W x 3`` and ``label`` a ``np.uint8``
          array ``H x W`` with values in ``0..num_classes-1`` or 255 (void).
        * otherwise ``transform(np.float32(image), label)``.

    Attributes:
        classes: class names in id order (from ``classes.json``).
        palette: ``np.uint8 [num_classes, 3]`` RGB colors.
        num_classes: number of classes (11).
        ignore_index: void label value (255).
        root: ``Path(root).absolute()``.
        files: list of ``(image_path, label_path)`` absolute path strings,
            sorted by file name.
        names: file stems, in the same order.

    Raises:
        ValueError: unknown ``split``; ``verify`` finds a file whose hash
            differs, that is missing, or that is not in the manifest (the
            message names the file).
        FileNotFoundError: a missing folder, ``classes.json``, manifest,
            label for an image, or image for a label (the message names it).

    Reading an item raises ``RuntimeError`` if OpenCV cannot decode a file
    and ``ValueError`` for a label that is not 2-D, does not match the image
    size, or holds values other than ``0..num_classes-1`` and 255; each
    message names the file.
    """

    ignore_index = 255

    def __init__(self, root, split, transform=None, verify=False, cache=False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
        self.root = Path(root).absolute()
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"CamVid root folder not found: {self.root}")
        self.classes, self.palette = _read_classes(self.root / "classes.json")
        self.num_classes = len(self.classes)
        self.files = self._pair_files()
        self.names = [Path(image).stem for image, _ in self.files]
        if verify:
            self.verify()
        self._cache: list | None = [None] * len(self.files) if cache else None

    def _pair_files(self) -> list[tuple[str, str]]:
        """Pair ``images/*.png`` with ``labels/*.png`` by file name (sorted)."""
        split_dir = self.root / self.split
        image_dir, label_dir = split_dir / "images", split_dir / "labels"
        for folder in (split_dir, image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found for split {self.split!r}: {folder}")
        images = sorted(p.name for p in image_dir.glob("*.png"))
        labels = sorted(p.name for p in label_dir.glob("*.png"))
        if not images:
            raise FileNotFoundError(f"no *.png images in {image_dir}")
        for missing, present_dir, absent_dir in (
            (sorted(set(images) - set(labels)), image_dir, label_dir),
            (sorted(set(labels) - set(images)), label_dir, image_dir),
        ):
            if missing:
                raise FileNotFoundError(
                    f"{absent_dir / missing[0]} not found (needed for {present_dir / missing[0]}); "
                    f"{len(missing)} file(s) unpaired"
                )
        return [(str(image_dir / n), str(label_dir / n)) for n in images]

    def verify(self) -> None:
        """Check ``classes.json`` and all files of the split against the manifest.

        Raises:
            FileNotFoundError: ``manifest.sha256`` is missing.
            ValueError: naming the first file (in sorted order) that is
                listed but missing, not listed, or whose sha256 differs.
        """
        manifest = _read_manifest(self.root / "manifest.sha256")
        prefix = f"{self.split}/"
        listed = {name for name in manifest if name.startswith(prefix)}
        on_disk = {Path(p).relative_to(self.root).as_posix() for pair in self.files for p in pair}
        for name in sorted(listed | on_disk | {"classes.json"}):
            path = self.root / name
            if name not in manifest:
                raise ValueError(f"{path} is not listed in {self.root / 'manifest.sha256'}")
            if not path.is_file():
                raise ValueError(f"{path} is listed in the manifest but missing")
            if _sha256(path) != manifest[name]:
                raise ValueError(f"sha256 mismatch for {path} (file changed or corrupt)")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode item ``index`` -> (uint8 RGB H x W x 3, uint8 H x W), checked (``datasets.read_pair``)."""
        return read_pair(*self.files[index], self.num_classes)

    def _get_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            return self._load(index)
        index = range(len(self))[index]  # normalise negatives, IndexError if out of range
        if self._cache[index] is None:
            self._cache[index] = self._load(index)
        image, label = self._cache[index]
        return image.copy(), label.copy()  # callers may not alter the cache

    def label(self, index: int) -> np.ndarray:
        """uint8 [H, W] class indices of item ``index`` (255 = void), untransformed (from the cache if on)."""
        return self._get_raw(index)[1]

    def preload(self) -> None:
        """Decode every item into the cache now (requires ``cache=True``).

        Call before creating DataLoader workers so that forked workers share
        the decoded arrays instead of each filling its own cache.

        Raises:
            RuntimeError: the dataset was built with ``cache=False``.
        """
        if self._cache is None:
            raise RuntimeError("preload() needs CamVid(..., cache=True)")
        for index in range(len(self)):
            if self._cache[index] is None:
                self._cache[index] = self._load(index)

    def __getitem__(self, index: int):
        image, label = self._get_raw(index)
        if self.transform is None:
            return image, label
        return self.transform(np.float32(image), label)

    def __repr__(self) -> str:
        return f"CamVid(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
