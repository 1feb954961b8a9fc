"""Tests for pspnet.data: the CamVid dataset (real data) and semseg-style transforms."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pspnet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CamVid,
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

CAMVID_ROOT = Path(
    os.environ.get("CAMVID_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid")
)
H, W = 360, 480
VALID = set(range(11)) | {255}


@pytest.fixture(scope="module")
def root() -> Path:
    if not (CAMVID_ROOT / "classes.json").is_file():
        pytest.skip(f"CamVid data not found at {CAMVID_ROOT} (set CAMVID_ROOT)")
    return CAMVID_ROOT


@pytest.fixture(scope="module")
def val(root) -> CamVid:
    return CamVid(root, "val")


# ---------------------------------------------------------------- real data
def test_split_sizes_and_pairing(root, val):
    train = CamVid(root, "train")
    assert (len(train), len(val)) == (367, 101)
    assert val.names == sorted(val.names)
    assert "0016E5_07959" in val.names and "0001TP_006690" in train.names
    for (image, label), name in zip(train.files + val.files, train.names + val.names):
        assert Path(image).name == Path(label).name == name + ".png"
        assert Path(image).parent.name == "images" and Path(label).parent.name == "labels"


def test_item_types_and_rgb_order(val):
    for i in (0, 50, -1):
        image, label = val[i]
        assert image.dtype == np.uint8 and image.shape == (H, W, 3)
        assert label.dtype == np.uint8 and label.shape == (H, W)
        bgr = cv2.imread(val.files[i][0], cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(image, bgr[:, :, ::-1])
    with pytest.raises(IndexError):
        val[len(val)]


def test_val_label_values_and_void_share(val):
    counts = np.zeros(256, np.int64)
    for i in range(len(val)):
        counts += np.bincount(val[i][1].ravel(), minlength=256)
    present = set(np.flatnonzero(counts).tolist())
    assert present == VALID  # every class and void occur in val, nothing else
    share = counts / counts.sum()
    assert share[255] == pytest.approx(0.017, abs=0.001)  # README: val void .017
    assert share[3] == pytest.approx(0.290, abs=0.001)  # Road


def test_classes_and_palette(root, val):
    entries = json.loads((root / "classes.json").read_text())
    assert val.classes == [e["name"] for e in sorted(entries, key=lambda e: e["id"])]
    assert val.classes[0] == "Sky" and val.classes[3] == "Road" and val.classes[10] == "Bicyclist"
    assert val.palette.dtype == np.uint8 and val.palette.shape == (11, 3)
    np.testing.assert_array_equal(val.palette, [e["color"] for e in entries])
    assert val.palette[4].tolist() == [0, 0, 192]  # Pavement = CamVid Sidewalk color
    assert (val.num_classes, val.ignore_index) == (11, 255)


def test_verify_passes_on_real_data(root):
    for split, n in (("train", 367), ("val", 101)):
        assert len(CamVid(root, split, verify=True)) == n


def test_val_transform_item(val):
    ds = CamVid(val.root, "val", transform=val_transform())
    image, label = ds[3]
    raw_image, raw_label = val[3]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert label.dtype == torch.int64 and label.shape == (H, W)
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    expected = ((raw_image.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(label.numpy(), raw_label)


def test_train_transform_on_real_item(val):
    for crop in ((361, 481), (97, 129)):
        ds = CamVid(val.root, "val", transform=train_transform(crop))
        random.seed(1)
        image, label = ds[7]
        assert image.dtype == torch.float32 and image.shape == (3, *crop)
        assert label.dtype == torch.int64 and label.shape == crop
        assert set(label.unique().tolist()) <= VALID
        random.seed(1)
        image2, label2 = ds[7]
        assert torch.equal(image, image2) and torch.equal(label, label2)


# ------------------------------------------------------- tmp copy, failures
@pytest.fixture
def small(root, tmp_path) -> Path:
    """A 3-item copy of the val split with a matching manifest."""
    names = sorted(p.name for p in (root / "val" / "images").glob("*.png"))[:3]
    lines = {ln.split()[1]: ln for ln in (root / "manifest.sha256").read_text().splitlines()}
    keep = ["classes.json"]
    shutil.copy(root / "classes.json", tmp_path / "classes.json")
    for kind in ("images", "labels"):
        (tmp_path / "val" / kind).mkdir(parents=True)
        for name in names:
            shutil.copy(root / "val" / kind / name, tmp_path / "val" / kind / name)
            keep.append(f"val/{kind}/{name}")
    (tmp_path / "manifest.sha256").write_text("\n".join(lines[k] for k in keep) + "\n")
    return tmp_path


def _first(small: Path, kind: str) -> Path:
    return sorted((small / "val" / kind).glob("*.png"))[0]


def test_small_copy_is_valid(small):
    ds = CamVid(small, "val", verify=True)
    assert len(ds) == 3 and ds[2][1].shape == (H, W)


def test_bad_split(small):
    with pytest.raises(ValueError, match="split"):
        CamVid(small, "training")
    with pytest.raises(FileNotFoundError, match="test"):
        CamVid(small, "test")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CamVid(small / "nowhere", "val")


def test_missing_label(small):
    label = _first(small, "labels")
    label.unlink()
    with pytest.raises(FileNotFoundError, match=label.name):
        CamVid(small, "val")


def test_missing_image_for_label(small):
    image = _first(small, "images")
    image.unlink()
    with pytest.raises(FileNotFoundError, match=image.name):
        CamVid(small, "val")


@pytest.mark.parametrize("kind", ["images", "labels"])
def test_truncated_png(small, kind):
    path = _first(small, kind)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = CamVid(small, "val")  # decoding happens on access
    with pytest.raises(RuntimeError, match=path.name):
        ds[0]
    assert ds[1][0].shape == (H, W, 3)  # other items still load


def test_manifest_mismatch(small):
    label = _first(small, "labels")
    array = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    array[0, 0] = 3 if array[0, 0] != 3 else 4  # still a valid label, different bytes
    cv2.imwrite(str(label), array)
    CamVid(small, "val")  # fine without verify
    with pytest.raises(ValueError, match=label.name):
        CamVid(small, "val", verify=True)


def test_manifest_missing_and_unlisted(small):
    manifest = small / "manifest.sha256"
    lines = manifest.read_text().splitlines()
    dropped = lines.pop()  # last val label no longer listed
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=Path(dropped.split()[1]).name + ".*not listed"):
        CamVid(small, "val", verify=True)
    manifest.write_text("\n".join(lines + [dropped]) + "\n")
    image, label = _first(small, "images"), _first(small, "labels")
    image.unlink(), label.unlink()
    with pytest.raises(ValueError, match=image.name + ".*missing"):
        CamVid(small, "val", verify=True)


def test_manifest_classes_json_checked(small):
    (small / "classes.json").write_text((small / "classes.json").read_text() + "\n")
    with pytest.raises(ValueError, match="classes.json"):
        CamVid(small, "val", verify=True)


def test_bad_label_value(small):
    label = _first(small, "labels")
    array = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    array[10, 10] = 11  # the SegNet void id, not mapped to 255
    cv2.imwrite(str(label), array)
    ds = CamVid(small, "val")
    with pytest.raises(ValueError, match=rf"{label.name}.*\[11\]"):
        ds[0]


@pytest.mark.parametrize("bad", ["size", "channels"])
def test_bad_label_shape(small, bad):
    label = _first(small, "labels")
    array = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    array = array[:-8] if bad == "size" else np.dstack([array] * 3)
    cv2.imwrite(str(label), array)
    with pytest.raises(ValueError, match=label.name):
        CamVid(small, "val")[0]


def test_cache_keeps_arrays_and_protects_them(small):
    ds = CamVid(small, "val", cache=True)
    image, label = ds[0]
    image[:] = 0
    label[:] = 0
    for path in ds.files[0]:
        Path(path).unlink()  # a second read must come from memory
    image2, label2 = ds[0]
    assert image2.any() and label2.any()
    ref = CamVid(CAMVID_ROOT, "val")
    np.testing.assert_array_equal(image2, ref[0][0])
    np.testing.assert_array_equal(label2, ref[0][1])


def test_preload(small):
    ds = CamVid(small, "val", cache=True)
    ds.preload()
    shutil.rmtree(small / "val")
    assert [ds[i][1].shape for i in range(3)] == [(H, W)] * 3
    with pytest.raises(RuntimeError, match="cache=True"):
        CamVid(CAMVID_ROOT, "val").preload()


# -------------------------------------------------------------- transforms
def _pair(h=20, w=30):
    """Asymmetric float32 image and a label derived from the same positions."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.dstack([rows, cols, rows * w + cols]).astype(np.float32)
    label = ((rows * w + cols) % 11).astype(np.uint8)
    return image, label


def test_crop_pads_smaller_input():
    image = np.full((5, 6, 3), 7.0, np.float32)
    label = np.ones((5, 6), np.uint8)
    for crop_type in ("rand", "center"):
        out_image, out_label = Crop((8, 9), crop_type=crop_type)(image, label)
        assert out_image.shape == (8, 9, 3) and out_label.shape == (8, 9)
        inside = np.zeros((8, 9), bool)
        inside[1:6, 1:7] = True  # pad 3 -> 1 before, 2 after (semseg: pad // 2 first)
        assert (out_label[inside] == 1).all() and (out_label[~inside] == 255).all()
        assert (out_image[inside] == 7.0).all()
        np.testing.assert_allclose(out_image[~inside], np.tile(IMAGENET_MEAN, ((~inside).sum(), 1)), rtol=1e-6)


def test_crop_pads_one_dim_and_crops_other():
    image, label = _pair(4, 30)
    random.seed(0)
    out_image, out_label = Crop((6, 10), padding=(1, 2, 3), ignore_label=99)(image, label)
    assert out_label.shape == (6, 10)
    assert (out_label[[0, 5]] == 99).all() and (out_image[0] == [1, 2, 3]).all()
    left = int(out_image[1, 0, 1])  # the column index channel gives the offset
    np.testing.assert_array_equal(out_label[1:5], label[:, left:left + 10])
    np.testing.assert_array_equal(out_image[1:5], image[:, left:left + 10])


def test_crop_random_and_center_windows():
    image, label = _pair(20, 30)
    out_image, out_label = Crop((10, 12), crop_type="center")(image, label)
    np.testing.assert_array_equal(out_image, image[5:15, 9:21])
    np.testing.assert_array_equal(out_label, label[5:15, 9:21])
    offsets = set()
    for seed in range(20):
        random.seed(seed)
        out_image, out_label = Crop((10, 12))(image, label)
        top, left = int(out_image[0, 0, 0]), int(out_image[0, 0, 1])
        np.testing.assert_array_equal(out_label, label[top:top + 10, left:left + 12])
        offsets.add((top, left))
    tops, lefts = {t for t, _ in offsets}, {c for _, c in offsets}
    assert len(tops) > 4 and len(lefts) > 4 and max(tops) <= 10 and max(lefts) <= 18


def test_flip_moves_image_and_label_together():
    image, label = _pair()
    out_image, out_label = RandomHorizontalFlip(p=1)(image, label)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_label, label[:, ::-1])
    assert out_image[0, 0, 1] == 29  # left column now holds the old right column
    out_image, out_label = RandomHorizontalFlip(p=0)(image, label)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_rotate_label_values_and_fill(val):
    image, label = val[0]
    image = image.astype(np.float32)
    random.seed(0)
    out_image, out_label = RandRotate((5, 10), p=1)(image, label)
    assert out_image.shape == (H, W, 3) and out_label.shape == (H, W)
    assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist()) | {255}
    assert out_label[0, 0] == 255 and out_label[-1, -1] == 255  # corners uncovered
    np.testing.assert_allclose(out_image[0, 0], IMAGENET_MEAN, rtol=1e-5)
    assert out_label[H // 2, W // 2] == label[H // 2, W // 2]  # centre is fixed
    assert (out_label != label).mean() > 0.02
    out_image, out_label = RandRotate(p=0)(image, label)
    np.testing.assert_array_equal(out_label, label)


def test_rotate_matches_opencv_formula():
    image, label = _pair(41, 61)
    random.seed(8)
    out_image, out_label = RandRotate((-10, 10), p=1)(image, label)
    random.seed(8)
    random.random()  # the p draw
    angle = -10 + 20 * random.random()
    assert angle > 9  # counter-clockwise (OpenCV convention) by about 9.2 degrees
    matrix = cv2.getRotationMatrix2D((61 / 2, 41 / 2), angle, 1)
    expected = cv2.warpAffine(label, matrix, (61, 41), flags=cv2.INTER_NEAREST, borderValue=255)
    np.testing.assert_array_equal(out_label, expected)
    # counter-clockwise: the top-right corner is uncovered, the right-edge middle row is not
    assert out_label[0, -1] == 255 and out_label[20, -1] != 255
    # the image moves with the label: its row/col channels point near the label's source pixel
    src = cv2.invertAffineTransform(matrix) @ np.array([50.0, 15.0, 1.0])  # (x, y) of output (15, 50)
    np.testing.assert_allclose(out_image[15, 50, [1, 0]], src, atol=1e-3)


def test_randscale_reproducible_sizes():
    image, label = _pair(H, W)
    scale = RandScale((0.5, 2.0))

    def sizes(seed):
        random.seed(seed)
        return [scale(image, label)[1].shape for _ in range(5)]

    first = sizes(123)
    assert first == sizes(123)
    assert len(set(first)) == 5
    random.seed(123)
    f = 0.5 + 1.5 * random.random()
    assert first[0] == (round(H * f), round(W * f))
    random.seed(123)
    out_image, out_label = scale(image, label)
    np.testing.assert_array_equal(out_image, cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out_label, cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST))
    for h, w in first:
        assert 0.5 * H - 1 <= h <= 2 * H + 1 and abs(w / h - W / H) < 0.01


def test_randscale_nearest_labels(val):
    image, label = val[1]
    random.seed(0)
    out_image, out_label = RandScale((0.6, 0.7))(image.astype(np.float32), label)
    assert out_image.shape[:2] == out_label.shape and out_label.shape[0] < H
    assert out_label.dtype == np.uint8
    assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist())


def test_gaussian_blur():
    image, label = _pair()
    out_image, out_label = RandomGaussianBlur(p=1)(image, label)
    np.testing.assert_array_equal(out_image, cv2.GaussianBlur(image, (5, 5), 0))
    assert not np.array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
    assert RandomGaussianBlur(p=0)(image, label)[0] is image


def test_resize():
    image, label = _pair(20, 30)
    out_image, out_label = Resize((9, 13))(image, label)
    assert out_image.shape == (9, 13, 3) and out_label.shape == (9, 13)
    np.testing.assert_array_equal(out_image, cv2.resize(image, (13, 9), interpolation=cv2.INTER_LINEAR))
    assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist())


def test_to_tensor_and_int64_labels():
    image, label = _pair(4, 5)
    out_image, out_label = ToTensor()(image, label.astype(np.int64))
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 4, 5)
    assert out_image.is_contiguous()
    assert out_label.dtype == torch.int64 and out_label.shape == (4, 5)
    np.testing.assert_array_equal(out_image.numpy(), image.transpose(2, 0, 1))
    np.testing.assert_array_equal(out_label.numpy(), label)
    # int64 labels go through the OpenCV transforms too
    _, flipped = RandomHorizontalFlip(p=1)(image, label.astype(np.int64))
    np.testing.assert_array_equal(flipped, label[:, ::-1])


def test_normalize_math():
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    assert mean[0] == pytest.approx(123.675) and std[2] == pytest.approx(57.375)
    image = torch.from_numpy(np.stack([np.full((2, 2), m + 2 * s) for m, s in zip(mean, std)])).float()
    label = torch.zeros(2, 2, dtype=torch.int64)
    out_image, out_label = Normalize()(image, label)
    torch.testing.assert_close(out_image, torch.full((3, 2, 2), 2.0))
    assert out_label is label
    assert image[0, 0, 0] == pytest.approx(mean[0] + 2 * std[0])  # not in place
    out_image, _ = Normalize(mean=(1, 2, 3), std=(2, 4, 8))(torch.ones(3, 1, 1) * 9, label)
    assert out_image.flatten().tolist() == [4.0, 1.75, 0.75]


def test_train_transform_end_to_end_synthetic():
    image, label = _pair(40, 50)
    pipeline = train_transform((61, 71))
    assert [type(t).__name__ for t in pipeline.transforms] == [
        "RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip", "Crop", "ToTensor", "Normalize",
    ]
    checked = 0
    for seed in range(8):
        random.seed(seed)
        out_image, out_label = pipeline(image, label)
        assert out_image.shape == (3, 61, 71) and out_image.dtype == torch.float32
        assert out_label.shape == (61, 71) and out_label.dtype == torch.int64
        assert set(out_label.unique().tolist()) <= set(range(11)) | {255}
        # padded/rotated-in regions hold the mean, i.e. 0 after Normalize (away
        # from their edge, which the bilinear rotation and 5x5 blur mix)
        pad = cv2.erode((out_label == 255).numpy().astype(np.uint8), np.ones((7, 7), np.uint8),
                        borderType=cv2.BORDER_REPLICATE).astype(bool)
        assert torch.allclose(out_image[:, torch.from_numpy(pad)], torch.zeros(1), atol=1e-4)
        checked += pad.sum()
    assert checked > 100


def test_val_transform_keeps_size():
    image, label = _pair(17, 23)
    out_image, out_label = val_transform()(image, label)
    assert out_image.shape == (3, 17, 23) and out_label.shape == (17, 23)


class _RandomPairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([random.random(), float(np.random.rand())])


def _epoch(seed):
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _RandomPairs(), batch_size=2, num_workers=2, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
    return torch.cat(list(loader))


def test_seed_worker_seeds_random_and_numpy_from_torch():
    draws = []
    for _ in range(2):
        torch.manual_seed(42)
        random.seed(0), np.random.seed(0)
        seed_worker(0)
        draws.append((random.random(), np.random.rand()))
    random.seed(42), np.random.seed(42)
    assert draws[0] == draws[1] == (random.random(), np.random.rand())


def test_seed_worker_reproducible_and_distinct():
    first = _epoch(0)
    assert torch.equal(first, _epoch(0))
    assert not torch.equal(first, _epoch(1))
    assert len(set(first[:, 0].tolist())) == 8  # workers do not repeat draws


# ------------------------------------------------------- argument checking
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: RandScale((2.0, 1.0)), "scale"),
        (lambda: RandScale((0.0, 1.0)), "scale"),
        (lambda: RandScale(1.5), "scale"),
        (lambda: RandRotate((10, -10)), "rotate"),
        (lambda: RandRotate(padding=(1, 2)), "padding"),
        (lambda: RandRotate(ignore_label=2.5), "ignore_label"),
        (lambda: RandRotate(p=1.5), "p"),
        (lambda: RandomGaussianBlur(radius=4), "radius"),
        (lambda: RandomGaussianBlur(p=-0.1), "p"),
        (lambda: RandomHorizontalFlip(p="0.5"), "p"),
        (lambda: Crop((0, 5)), "size"),
        (lambda: Crop(5.5), "size"),
        (lambda: Crop((True, 5)), "size"),
        (lambda: Crop(5, crop_type="corner"), "crop_type"),
        (lambda: Resize((3,)), "size"),
        (lambda: Normalize(mean=(1, 2)), "mean"),
        (lambda: Normalize(std=(1, 0, 1)), "std"),
        (lambda: Compose([1]), "transforms"),
        (lambda: train_transform((0, 10)), "crop_size"),
        (lambda: train_transform((10, 10), scale=(1, 1)), "scale"),
    ],
)
def test_bad_arguments(build, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        build()


@pytest.mark.parametrize(
    "image, label, expected",
    [
        (np.zeros((4, 5), np.float32), np.zeros((4, 5), np.uint8), "H x W x 3"),
        (np.zeros((4, 5, 4), np.float32), np.zeros((4, 5), np.uint8), "H x W x 3"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 6), np.uint8), "must equal the image size"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5, 1), np.uint8), "label must be"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.float32), "integer"),
    ],
)
def test_bad_inputs(image, label, expected):
    for transform in (RandScale(), RandRotate(), RandomGaussianBlur(), RandomHorizontalFlip(),
                      Crop(3), Resize(3), ToTensor()):
        with pytest.raises(ValueError, match=expected):
            transform(image, label)


def test_normalize_rejects_arrays():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        Normalize()(np.zeros((3, 4, 4), np.float32), None)
