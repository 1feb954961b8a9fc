"""ADE20K, VOC2012 (SBD), Cityscapes and the generic folder dataset on tiny fixtures written in each
dataset's real on-disk layout: loading, label mapping, transforms, and clear errors for missing or corrupt
files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pspnet.data import ADE20K, VOC2012, Cityscapes, ImageFolderSegmentation
from pspnet.data.datasets import voc_palette

H, W = 6, 8


def write_image(path: Path, seed: int = 0) -> np.ndarray:
    """A random RGB image at ``path`` (PNG or JPEG by suffix); returns the RGB array written."""
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_label(path: Path, values) -> np.ndarray:
    label = np.resize(np.array(values, dtype=np.uint8), (H, W))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label)
    return label


def make_ade(tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for split, sub in (("train", "training"), ("val", "validation")):
        for k in range(2):
            write_image(root / "images" / sub / f"ADE_{split}_{k:08d}.jpg", k)
            write_label(root / "annotations" / sub / f"ADE_{split}_{k:08d}.png", [0, 1, 150, 75])
    return root


def test_ade20k(tmp_path):
    root = make_ade(tmp_path)
    (root / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n" + "".join(
        f"{k},0.1,1,1,name{k};alias\n" for k in range(1, 151)))
    ds = ADE20K(root, "train")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.classes[0] == "name1" and ds.classes[-1] == "name150"
    image, label = ds[0]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {255, 0, 149, 74}           # label - 1, "other" (0) -> 255
    assert np.array_equal(label, np.resize(np.array([255, 0, 149, 74], np.uint8), (H, W)))
    assert len(ADE20K(root, "val")) == 2
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20K(root, "training")


def test_voc2012_sbd(tmp_path):
    root = tmp_path / "voc2012"
    rgb = write_image(root / "JPEGImages" / "2007_000032.png", 3)   # PNG here: the RGB order checked exactly
    write_label(root / "SegmentationClassAug" / "2007_000032.png", [0, 20, 255, 15])
    write_image(root / "JPEGImages" / "2007_000033.jpg", 4)
    write_label(root / "SegmentationClassAug" / "2007_000033.png", [1])
    (root / "list").mkdir()
    (root / "list" / "train_aug.txt").write_text("JPEGImages/2007_000032.png SegmentationClassAug/2007_000032.png\n"
                                                 "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n")
    (root / "list" / "val.txt").write_text("JPEGImages/2007_000033.jpg SegmentationClassAug/2007_000033.png\n")
    ds = VOC2012(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.classes[15] == "person"
    image, label = ds[0]
    assert np.array_equal(image, rgb)
    assert set(np.unique(label).tolist()) == {0, 15, 20, 255}
    assert len(VOC2012(root, "val")) == 1
    seen = {}
    ds.transform = lambda img, lab: seen.setdefault("args", (img.dtype, lab.dtype))
    ds[1]
    assert seen["args"] == (np.float32, np.uint8)
    write_label(root / "SegmentationClassAug" / "2007_000033.png", [21])
    with pytest.raises(ValueError, match="2007_000033.png has values \\[21\\] outside 0..20 and 255"):
        VOC2012(root, "val")[0]
    (root / "list" / "val.txt").write_text("JPEGImages/missing.jpg SegmentationClassAug/2007_000033.png\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg not found \\(line 1 of"):
        VOC2012(root, "val")


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    for city in ("aachen", "bochum"):
        stem = f"{city}_000000_000019"
        write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        write_label(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33, 6, 24])
    ds = Cityscapes(root, "train")
    assert len(ds) == 2 and ds.names[0].startswith("aachen") and ds.num_classes == 19
    _, label = ds[1]
    assert np.array_equal(label, np.resize(np.array([0, 13, 255, 18, 255, 11], np.uint8), (H, W)))
    assert ds.palette.shape == (19, 3) and tuple(ds.palette[0]) == (128, 64, 128)
    (root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="bochum_000000_000019_gtFine_labelIds.png not found"):
        Cityscapes(root, "train")
    with pytest.raises(FileNotFoundError, match="Cityscapes leftImg8bit folder not found"):
        Cityscapes(root, "val")


def test_image_folder_and_corrupt_files(tmp_path):
    root = tmp_path / "mine"
    write_image(root / "train" / "images" / "a.jpg")
    write_label(root / "train" / "labels" / "a.png", [0, 1, 2, 255])
    write_image(root / "train" / "images" / "b.png")
    write_label(root / "train" / "labels" / "b.png", [2])
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    ds = ImageFolderSegmentation(root, "train")
    assert ds.classes == ["sky", "road", "car"] and ds.names == ["a", "b"]
    assert set(np.unique(ds[0][1]).tolist()) == {0, 1, 2, 255}
    assert ImageFolderSegmentation(root, "train", num_classes=5).num_classes == 5
    (root / "train" / "images" / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(RuntimeError, match="cannot decode image .*b.png"):
        ds[1]
    cv2.imwrite(str(root / "train" / "labels" / "a.png"), np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ValueError, match="a.png has size \\(7, 8\\) but image"):
        ds[0]
    (tmp_path / "no_names").mkdir()
    with pytest.raises(ValueError, match="needs num_classes or a class list"):
        ImageFolderSegmentation(tmp_path / "no_names", "train")
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        ImageFolderSegmentation(tmp_path / "nowhere", "train", num_classes=2)


def test_voc_palette():
    palette = voc_palette(21)
    assert tuple(palette[0]) == (0, 0, 0) and tuple(palette[1]) == (128, 0, 0) and tuple(palette[15]) == (192, 128, 128)


def test_trainer_opens_each_dataset(tmp_path):
    """The config's ``dataset`` key selects the layout; build_train_set / build_eval_set check classes."""
    from pspnet.config import ConfigError, TrainConfig
    from pspnet.loaders import build_eval_set, build_train_set
    root = make_ade(tmp_path)
    cfg = TrainConfig(dataset="ade20k", data_root=str(root), classes=150, train_h=5, train_w=5)
    image, label = build_train_set(cfg)[0]
    assert tuple(image.shape) == (3, 5, 5) and tuple(label.shape) == (5, 5)
    assert len(build_eval_set(cfg, "val")) == 2
    with pytest.raises(ConfigError, match="config key 'classes': 19 but the dataset"):
        build_eval_set(TrainConfig(dataset="ade20k", data_root=str(root), classes=19), "val")
    with pytest.raises(ConfigError, match="config key 'dataset': one of camvid, ade20k"):
        TrainConfig(dataset="coco").validate()


def test_registry_opens_each_name(tmp_path):
    """One registry: the built-in names, each class with the options it takes, unknown names named."""
    from pspnet.data import CamVid, dataset_names, open_dataset
    assert dataset_names() == ("camvid", "ade20k", "voc2012", "cityscapes", "folder")
    assert isinstance(open_dataset("ade20k", make_ade(tmp_path), "val", cache=True, num_classes=7), ADE20K)
    root = tmp_path / "mine"
    write_image(root / "val" / "images" / "a.png")
    write_label(root / "val" / "labels" / "a.png", [0, 1])
    assert open_dataset("folder", root, "val", num_classes=4).num_classes == 4
    camvid = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
    if (camvid / "classes.json").is_file():
        ds = open_dataset("camvid", camvid, "val", cache=True)
        assert isinstance(ds, CamVid) and ds._cache is not None
    with pytest.raises(ValueError, match="dataset must be one of .*'camvid'.*got 'coco'"):
        open_dataset("coco", root, "val")


def test_registered_dataset_is_seen_by_config_and_loaders(tmp_path, monkeypatch):
    """A layout added with register_dataset is valid for the config's ``dataset`` key and opened by the
    trainer's and evaluate's dataset builders."""
    from pspnet.config import ConfigError, TrainConfig
    from pspnet.data import registry
    from pspnet.loaders import build_eval_set
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    root = tmp_path / "mine"
    write_image(root / "val" / "images" / "a.png")
    write_label(root / "val" / "labels" / "a.png", [0, 1])
    registry.register_dataset("mine", ImageFolderSegmentation, options=("num_classes",))
    cfg = TrainConfig(dataset="mine", data_root=str(root), classes=3).validate()
    assert isinstance(build_eval_set(cfg, "val"), ImageFolderSegmentation) and build_eval_set(cfg).num_classes == 3
    with pytest.raises(ValueError, match="'mine' is already registered"):
        registry.register_dataset("mine", ADE20K)
    with pytest.raises(ValueError, match="options must be among"):
        registry.register_dataset("other", ADE20K, options=("verify",))
    with pytest.raises(TypeError, match="cls must be callable"):
        registry.register_dataset("other", "ADE20K")
    monkeypatch.setattr(registry, "_REGISTRY", {})
    with pytest.raises(ConfigError, match="config key 'dataset'"):
        cfg.validate()


@pytest.mark.parametrize("name", ["ade20k", "voc2012", "cityscapes"])
@pytest.mark.parametrize("layers", [50, 101])
def test_paper_recipes_load(name, layers):
    """configs/<dataset>_pspnet<layers>.yaml: semseg's recipe (docs/semseg_parity.md), valid for the trainer."""
    from pspnet.config_files import load_config
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / f"{name}_pspnet{layers}.yaml"), [])
    crop, epochs, classes = {"ade20k": (473, 100, 150), "voc2012": (473, 50, 21), "cityscapes": (713, 200, 19)}[name]
    assert (cfg.dataset, cfg.layers, cfg.classes, cfg.train_h, cfg.train_w, cfg.epochs) == (
        name, layers, classes, crop, crop, epochs)
    assert (cfg.batch_size, cfg.base_lr, cfg.head_lr_mult, cfg.aux_weight, cfg.power, cfg.weight_decay) == (
        16, 0.01, 10, 0.4, 0.9, 1e-4)
    assert (cfg.scale_min, cfg.scale_max, cfg.rotate_min, cfg.rotate_max, cfg.flip) == (0.5, 2.0, -10, 10, True)


def test_train_and_evaluate_on_cityscapes_layout_with_imagenet_init(tmp_path):
    """``python -m pspnet.train`` with the Cityscapes recipe (shrunk) on files in Cityscapes' layout, the
    backbone initialised from an ImageNet-format file; then ``python -m pspnet.evaluate`` on its val split."""
    import torch

    from pspnet.evaluate import main as evaluate_main
    from pspnet.models import ResNet
    from pspnet.models.resnet import RESNET_BLOCKS
    from pspnet.train import main as train_main
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        for k in range(2):
            stem = f"aachen_{k:06d}_000019"
            write_image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", k)
            write_label(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33])
    weights = tmp_path / "resnet18_deep.pth"
    torch.save(ResNet(RESNET_BLOCKS[18][0], RESNET_BLOCKS[18][1], num_classes=1000).state_dict(), weights)
    run = tmp_path / "run"
    common = ["--config", str(Path(__file__).parents[1] / "configs" / "cityscapes_pspnet50.yaml"),
              "--data_root", str(root), "--layers", "18", "--base_size", "16", "--test_h", "17", "--test_w", "17",
              "--workers", "0", "--threads", str(torch.get_num_threads())]
    assert train_main([*common, "--save_path", str(run), "--batch_size", "2", "--train_h", "17", "--train_w", "17",
                       "--max_iters", "1", "--backbone_weights", str(weights), "--no-progress"]) == 0
    assert (run / "final.pth").is_file()
    out = tmp_path / "eval"
    assert evaluate_main([*common, "--checkpoint", str(run / "final.pth"), "--save-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["classes"]) == 19 and 0 <= metrics["miou"] <= 1
