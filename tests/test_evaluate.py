"""pspnet.inference (semseg tool/test.py semantics), pspnet.visualize and the pspnet.evaluate CLI."""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pspnet.config_files import load_config
from pspnet.data import IMAGENET_MEAN, IMAGENET_STD
from pspnet.evaluate import main as evaluate_main
from pspnet.predict import main as predict_main
from pspnet.inference import predict, predict_probs, scaled_size, window_starts
from pspnet.models import PSPNet
from pspnet.precision import resolve_amp
from pspnet.visualize import colorize, overlay

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = (REPO.parent / "shared" / "data" / "camvid").resolve()
CONFIG = REPO / "configs" / "camvid.yaml"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "classes.json").is_file(), reason="CamVid not available")

K = 5


def normalize(image):
    x = torch.from_numpy(np.float32(image).transpose(2, 0, 1))
    return ((x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None]


def pointwise_model():
    """Per-pixel classifier: its output at a pixel depends only on that pixel, so sliding-window
    stitching must reproduce whole-image inference exactly."""
    torch.manual_seed(1)
    return nn.Conv2d(3, K, 1).eval()


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- window geometry

@pytest.mark.parametrize("size,crop", [(512, 473), (473, 473), (713, 713), (2048, 713), (100, 7), (181, 180),
                                       (360, 240)])
def test_window_starts_cover_every_pixel(size, crop):
    starts = window_starts(size, crop)
    stride = math.ceil(crop * 2 / 3)
    assert len(starts) == math.ceil((size - crop) / stride) + 1
    assert starts[0] == 0 and starts[-1] == size - crop  # last window snapped to the border
    assert all(0 <= s <= size - crop for s in starts)
    count = np.zeros(size, int)
    for s in starts:
        count[s:s + crop] += 1
    assert count.min() >= 1


def test_window_starts_semseg_values():
    assert window_starts(512, 473) == [0, 39]  # stride 316
    assert window_starts(2048, 713) == [0, 476, 952, 1335]
    with pytest.raises(ValueError, match="crop"):
        window_starts(10, 11)


def test_scaled_size_keeps_aspect_like_semseg():
    assert scaled_size(360, 480, 240) == (180, 240)
    assert scaled_size(480, 360, 240) == (240, 180)
    assert scaled_size(360, 480, round(0.75 * 240)) == (135, 180)


# ---------------------------------------------------------------------------- sliding window / flip / scales

@pytest.mark.parametrize("crop", [(17, 23), (30, 40), (50, 50), (64, 64)])
def test_sliding_window_equals_whole_image_for_pointwise_model(crop):
    model = pointwise_model()
    image = random_image(30, 40)
    with torch.no_grad():
        expected = F.softmax(model(normalize(image)), 1)[0].numpy()
    got = predict_probs(model, image, K, base_size=40, crop_size=crop)
    assert got.shape == (K, 30, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


def test_pspnet_crop_equal_to_image_is_whole_image_inference():
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=K, fused=True).eval()
    image = random_image(41, 57, seed=3)
    with torch.no_grad():
        expected = F.softmax(model(normalize(image)), 1)[0].numpy()
    got = predict_probs(model, image, K, base_size=57, crop_size=(41, 57), window_batch=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # batching windows (and their flips) does not change the result: BN is in eval mode
    a = predict_probs(model, image, K, base_size=57, crop_size=(25, 33), flip=True, window_batch=1)
    b = predict_probs(model, image, K, base_size=57, crop_size=(25, 33), flip=True, window_batch=64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert predict(model, image, K, 57, (25, 33), flip=True).dtype == np.int64


def test_flip_averages_mirrored_pass():
    torch.manual_seed(2)
    model = nn.Conv2d(3, K, 3, padding=1).eval()  # not mirror-symmetric
    image = random_image(20, 28, seed=4)
    x = normalize(image)
    with torch.no_grad():
        expected = (F.softmax(model(x), 1) + F.softmax(model(x.flip(3)), 1).flip(3))[0].numpy() / 2
    got = predict_probs(model, image, K, base_size=28, crop_size=(20, 28), flip=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_multi_scale_averages_probabilities_resized_back():
    model = pointwise_model()
    image = random_image(30, 40, seed=5)
    expected = np.zeros((K, 30, 40), np.float32)
    for s in (0.5, 1.5):
        h, w = scaled_size(30, 40, round(s * 40))
        scaled = cv2.resize(np.float32(image), (w, h), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            p = F.softmax(model(normalize(scaled)), 1)
        expected += F.interpolate(p, (30, 40), mode="bilinear", align_corners=False)[0].numpy() / 2
    got = predict_probs(model, image, K, base_size=40, crop_size=(16, 16), scales=[0.5, 1.5])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_predict_restores_mode_and_rejects_bad_input():
    model = pointwise_model().train()
    predict(model, random_image(8, 8), K, 8, (8, 8))
    assert model.training
    with pytest.raises(ValueError, match="image"):
        predict(model, np.zeros((8, 8), np.uint8), K, 8, (8, 8))
    with pytest.raises(ValueError, match="scales"):
        predict(model, random_image(8, 8), K, 8, (8, 8), scales=[])
    with pytest.raises(ValueError, match="channels"):
        predict(model, random_image(8, 8), K + 1, 8, (8, 8))


# ---------------------------------------------------------------------------- visualisation

def test_colorize_and_overlay():
    palette = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
    label = np.array([[0, 1], [255, 1]], np.uint8)
    color = colorize(label, palette)
    assert color.tolist() == [[[10, 20, 30], [200, 100, 0]], [[0, 0, 0], [200, 100, 0]]]
    image = np.full((2, 2, 3), 100, np.uint8)
    blend = overlay(image, color, 0.5)
    assert blend.dtype == np.uint8 and blend[0, 1].tolist() == [150, 100, 50]
    with pytest.raises(ValueError, match="shape"):
        overlay(image[:1], color)


# ---------------------------------------------------------------------------- CLI

def _small_args(tmp_path, *extra):
    return ["--data_root", str(DATA_ROOT), "--max_val_samples", "2", "--base_size", "96", "--test_h", "49",
            "--test_w", "65", "--no-progress", *extra]


@needs_data
def test_evaluate_semseg_checkpoint_writes_metrics_and_pngs(tmp_path, capsys):
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=11)
    semseg_ckpt = tmp_path / "train_epoch_50.pth"  # semseg format: DDP 'module.' keys
    torch.save({"epoch": 50, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {}}, semseg_ckpt)
    save_dir = tmp_path / "out"
    (save_dir / "pred").mkdir(parents=True)
    keep = save_dir / "pred" / "keep.txt"
    keep.write_text("user data")

    assert evaluate_main(["--config", str(CONFIG), "--checkpoint", str(semseg_ckpt),
                          "--save-dir", str(save_dir), *_small_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mIoU/mAcc/allAcc" in out and "Bicyclist" in out
    metrics = json.loads((save_dir / "metrics.json").read_text())
    for key in ("miou", "macc", "allacc", "iou", "acc", "checkpoint", "scales", "flip"):
        assert key in metrics
    assert len(metrics["iou"]) == 11 and metrics["images"] == 2 and metrics["scales"] == [1.0]
    assert "| Sky" in (save_dir / "metrics.md").read_text()
    assert keep.read_text() == "user data"
    preds = sorted((save_dir / "pred").glob("*.png"))
    overlays = sorted((save_dir / "overlay").glob("*.png"))
    assert len(preds) == 2 and [p.name for p in preds] == [p.name for p in overlays]
    from pspnet.data import CamVid
    ds = CamVid(DATA_ROOT, "val")
    assert preds[0].stem == ds.names[0]
    pred_rgb = cv2.cvtColor(cv2.imread(str(preds[0])), cv2.COLOR_BGR2RGB)
    assert pred_rgb.shape == (360, 480, 3)
    colours = {tuple(c) for c in pred_rgb.reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in ds.palette.tolist()}
    assert cv2.imread(str(overlays[0])).shape == (360, 480, 3)


@needs_data
def test_evaluate_uses_stored_config_and_overrides(tmp_path):
    cfg = load_config(CONFIG, ["--data_root", str(DATA_ROOT)])
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=11)
    path = tmp_path / "final.pth"
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "iteration": 0}, path)
    assert evaluate_main(["--checkpoint", str(path), "--no-images", "--scales", "0.5,1.0", "--flip",
                          *_small_args(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "eval_val" / "metrics.json").read_text())
    assert metrics["scales"] == [0.5, 1.0] and metrics["flip"] is True
    assert not (tmp_path / "eval_val" / "pred").exists()


def test_evaluate_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(tmp_path / "missing.pth")])
    assert e.value.code == 2 and "missing.pth" in capsys.readouterr().err
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(path)])
    assert e.value.code == 2 and "--config is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(path), "--config", str(CONFIG), "--scalez", "1"])
    assert e.value.code == 2 and "scalez" in capsys.readouterr().err


# ---------------------------------------------------------------------------- pspnet.predict

def test_predict_writes_colour_overlay_and_label_pngs(tmp_path, capsys):
    """``python -m pspnet.predict`` on a file and a folder: one colour map, overlay and id map per image, equal
    to ``inference.predict`` of the loaded model (``--amp none``), in the checkpoint's stored colours; with
    ``--amp auto`` it prints the precision it picked and agrees but for near-ties."""
    cfg = load_config(CONFIG, ["--base_size", "64", "--test_h", "48", "--test_w", "64", "--device", "cpu"])
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=11).eval()
    palette = np.random.default_rng(1).integers(0, 256, (11, 3))
    path = tmp_path / "final.pth"
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "palette": palette.tolist()}, path)
    folder = tmp_path / "images"
    folder.mkdir()
    images = {"a": random_image(50, 70, seed=2), "b": random_image(37, 29, seed=3)}
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(images["a"], cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "b.jpg"
    cv2.imwrite(str(single), cv2.cvtColor(images["b"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = tmp_path / "out"
    assert predict_main([str(folder), str(single), "--checkpoint", str(path), "--out-dir", str(out),
                         "--no-progress", "--amp", "none"]) == 0
    assert "wrote 2 predictions" in capsys.readouterr().out
    assert predict_main([str(single), "--checkpoint", str(path), "--out-dir", str(tmp_path / "auto"),
                         "--no-progress", "--amp", "auto"]) == 0
    amp, reason = resolve_amp("auto", torch.device("cpu"))
    assert f"precision: {amp} ({reason})" in capsys.readouterr().out
    auto_ids = cv2.imread(str(tmp_path / "auto" / "label" / "b.png"), cv2.IMREAD_UNCHANGED)
    for stem in ("a", "b"):
        image = cv2.cvtColor(cv2.imread(str(folder / "a.png") if stem == "a" else str(single)), cv2.COLOR_BGR2RGB)
        expected = predict(model, image, 11, 64, (48, 64))
        ids = cv2.imread(str(out / "label" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(ids, expected)
        colour = cv2.cvtColor(cv2.imread(str(out / "pred" / f"{stem}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(colour, palette[expected])
        assert cv2.imread(str(out / "overlay" / f"{stem}.png")).shape == image.shape
    assert sorted(p.name for p in out.iterdir()) == ["label", "overlay", "pred"]
    assert (auto_ids != expected).mean() <= 0.01          # expected: image b's, the loop's last


def test_predict_bad_inputs_name_the_file(tmp_path, capsys):
    cfg = load_config(CONFIG, ["--device", "cpu"])
    path = tmp_path / "final.pth"
    torch.save({"state_dict": PSPNet(layers=18, classes=11).state_dict(), "config": cfg.to_dict()}, path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "broken.jpg").write_bytes(b"")
    cases = [([str(tmp_path / "nope.png")], "input not found"), ([str(broken)], "cannot decode image"),
             ([str(broken), str(tmp_path / "x")], "same stem 'broken'"), ([str(tmp_path)], "cannot decode image")]
    for inputs, message in cases:
        with pytest.raises(SystemExit) as e:
            predict_main([*inputs, "--checkpoint", str(path), "--out-dir", str(tmp_path / "out"), "--no-progress"])
        assert e.value.code == 2 and message in capsys.readouterr().err, inputs
    assert not (tmp_path / "out" / "label").exists()
