"""Deploy: pspnet.export (ONNX with dynamic H, W; torch.export), the psp:: ops' ONNX translations
(psp_kernels.onnx_ops) in ONNX Runtime, and pspnet.predict --onnx."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psp_kernels import PyramidPooling
from psp_kernels.ops import multibin_avg_pool, upsample_concat
from pspnet.export import ExportError, main as export_main, to_onnx, to_pt2
from pspnet.models import PSPNet
from pspnet.onnx_runtime import OnnxSegmenter, open_session
from pspnet.predict import main as predict_main
from tests.helpers import randomize_batchnorms

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = (REPO.parent / "shared" / "data" / "camvid").resolve()
CONFIG = REPO / "configs" / "camvid.yaml"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "classes.json").is_file(), reason="CamVid not available")

MODEL_SIZES = [(233, 233), (257, 321), (129, 97), (360, 480), (97, 161)]   # divisible by 8 or not, odd maps
BATCH_OF_THREE = {(129, 97), (97, 161)}                                     # N = 3 too at these sizes
LIMIT = 1e-4                                                                 # the export's own refusal bound


def quiet(_line: str) -> None:
    """``report`` for the exports in these tests."""


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def exported(module: nn.Module, tmp_path: Path, size=(23, 29), name="m.onnx", **kwargs) -> OnnxSegmenter:
    return OnnxSegmenter(open_session(to_onnx(module, tmp_path / name, size, report=quiet, **kwargs)))


def exported_op(module: nn.Module, tmp_path: Path, name="m.onnx") -> OnnxSegmenter:
    """A single op's dynamic export, down to 1x1 inputs."""
    return exported(module, tmp_path, name=name, min_size=1)


class MultibinPool(nn.Module):
    def __init__(self, bins):
        super().__init__()
        self.bins = bins

    def forward(self, x):
        return multibin_avg_pool(x, self.bins)


class AdaptivePools(nn.Module):
    """semseg's unfused pooling (``nn.AdaptiveAvgPool2d`` per bin): the aten op's translation."""

    def __init__(self, bins):
        super().__init__()
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in bins)

    def forward(self, x):
        return torch.cat([pool(x).flatten(2) for pool in self.pools], 2)


class PoolUpsample(nn.Module):
    """``psp::upsample_concat`` of the packed pooled first two channels of x."""

    def __init__(self, bins):
        super().__init__()
        self.bins = bins

    def forward(self, x):
        return upsample_concat(x, multibin_avg_pool(x[:, :2].contiguous(), self.bins), self.bins)


def upsample_reference(x, bins):
    ups = [F.interpolate(F.adaptive_avg_pool2d(x[:, :2], b), x.shape[2:], mode="bilinear", align_corners=True)
           for b in bins]
    return torch.cat([x, *ups], 1)


@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 3, 5)])
def test_pooling_translations_exact_at_every_size(tmp_path, bins):
    """One dynamic model each (psp::multibin_avg_pool; aten adaptive_avg_pool2d of the unfused PPM), every
    H, W in 1..40 (windows overlapping, H or W smaller than a bin) against nn.AdaptiveAvgPool2d."""
    fused, unfused = exported_op(MultibinPool(bins), tmp_path, "f.onnx"), exported_op(AdaptivePools(bins), tmp_path)
    generator = torch.Generator().manual_seed(0)
    for height in range(1, 41):
        for width in range(1, 41):
            x = torch.randn(2, 3, height, width, generator=generator)
            want = torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], 2)
            for session in (fused, unfused):
                torch.testing.assert_close(session(x), want, rtol=1e-6, atol=1e-6, msg=f"{height}x{width}")


@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 3, 5)])
def test_upsample_translation_exact_at_every_size(tmp_path, bins):
    session = exported_op(PoolUpsample(bins), tmp_path)
    generator = torch.Generator().manual_seed(1)
    for height in range(1, 41):
        for width in range(1, 41):
            x = torch.randn(1, 3, height, width, generator=generator)
            torch.testing.assert_close(session(x), upsample_reference(x, bins), rtol=1e-6, atol=1e-6,
                                       msg=f"{height}x{width}")


def test_fused_pyramid_pooling_module(tmp_path):
    """psp::pyramid_pooling (the fused PPM before a concat head) against semseg's module forward."""
    ppm = PyramidPooling(3, 1, (1, 2, 3, 6))
    randomize_batchnorms(ppm)
    session = exported_op(ppm.eval(), tmp_path)
    reference = PyramidPooling(3, 1, (1, 2, 3, 6), fused=False)
    reference.load_state_dict(ppm.state_dict())
    reference.eval()
    for height, width in [(1, 1), (5, 3), (13, 17), (40, 7), (61, 60)]:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(session(x), reference(x), rtol=1e-5, atol=1e-5, msg=f"{height}x{width}")


def make_pspnet(layers: int, fused: bool) -> PSPNet:
    torch.manual_seed(layers)
    model = PSPNet(layers=layers, classes=3, fused=fused)
    randomize_batchnorms(model)
    return model.eval()


def assert_graph_structure(path: Path, head_in_channels: int) -> None:
    """Every conv weight is an initializer (BatchNorm folded at export), no BatchNormalization node is left, and
    the last 3x3 conv (the head's) reads ``head_in_channels``."""
    import onnx
    graph = onnx.load(str(path)).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in weights for n in convs)
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    head = [weights[n.input[1]] for n in convs if weights[n.input[1]][2:] == [3, 3]][-1]
    assert head == [512, head_in_channels, 3, 3]


@pytest.mark.parametrize("layers", [18, 50])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_whole_model_dynamic_export(tmp_path, layers, fused):
    """One dynamic export (example 233x233) run in ONNX Runtime at five sizes, N = 1 (and 3), vs eager fp32;
    the graph has BatchNorm folded and, fused, the concat-free head conv (C input channels, semseg's: 2C)."""
    model = make_pspnet(layers, fused)
    session = exported(model, tmp_path, (233, 233))
    assert_graph_structure(tmp_path / "m.onnx", model.fea_dim * (1 if fused else 2))
    for size in MODEL_SIZES:
        for n in (1, 3) if size in BATCH_OF_THREE else (1,):
            x = torch.randn(n, 3, *size)
            with torch.no_grad():
                want = model(x)
            got = session(x)
            assert got.shape == want.shape and rel(got, want) <= LIMIT, (size, n, rel(got, want))


def test_static_export_fixes_the_size(tmp_path):
    model = make_pspnet(18, True)
    session = exported(model, tmp_path, (129, 97), dynamic=False)
    for n in (1, 3):
        x = torch.randn(n, 3, 129, 97)
        with torch.no_grad():
            assert rel(session(x), model(x)) <= LIMIT
    with pytest.raises(Exception, match="dimension|Got invalid"):
        session(torch.randn(1, 3, 97, 129))


def test_pt2_export_reloads_with_dynamic_size(tmp_path):
    model = make_pspnet(18, True)
    lines = []
    path = to_pt2(model, tmp_path / "m.pt2", (129, 97), report=lines.append)
    assert "fresh process" in lines[0]
    program = torch.export.load(path)
    x = torch.randn(2, 3, 97, 161)
    with torch.no_grad():
        assert rel(program.module()(x), model(x)) <= LIMIT


class UncoveredOp(nn.Module):
    def forward(self, x):
        return torch.ops.psp.multibin_avg_pool_backward(x.flatten(2)[:, :, :50].contiguous(), [1, 2, 3, 6], 4, 4,
                                                        False)


def test_refusals_leave_nothing_behind(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="does not cover"):
        to_onnx(UncoveredOp(), tmp_path / "u.onnx", (8, 8), report=quiet)
    with pytest.raises(ValueError, match="opset"):
        to_onnx(make_pspnet(18, True), tmp_path / "o.onnx", (33, 33), opset=17, report=quiet)
    existing = tmp_path / "keep.onnx"
    existing.write_bytes(b"user's model")
    monkeypatch.setattr("pspnet.export.MAX_RELATIVE_ERROR", -1.0)       # every verification now fails
    with pytest.raises(ExportError, match="nothing was written"):
        to_onnx(MultibinPool((1, 2, 3, 6)), existing, (13, 17), report=quiet)
    assert existing.read_bytes() == b"user's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def tiny_checkpoint(tmp_path: Path, overrides=()) -> Path:
    from pspnet.config_files import load_config
    cfg = load_config(CONFIG, ["--base_size", "96", "--test_h", "49", "--test_w", "65", "--device", "cpu",
                               *overrides])
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=cfg.classes, fused=True)
    randomize_batchnorms(model)
    palette = np.random.default_rng(1).integers(0, 256, (cfg.classes, 3)).tolist()
    path = tmp_path / "final.pth"
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "palette": palette}, path)
    return path


def test_cli_bad_inputs_one_line_each(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    cases = [(["--checkpoint", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "a.onnx")], "missing.pth"),
             (["--checkpoint", str(checkpoint), "--output", str(tmp_path / "file" / "a.onnx")], "output folder"),
             (["--checkpoint", str(checkpoint), "--output", str(tmp_path / "a.onnx"), "--opset", "17"], "opset"),
             (["--checkpoint", str(checkpoint), "--output", str(tmp_path / "a.pt2"), "--format", "pt2",
               "--opset", "20"], "--opset"),
             (["--checkpoint", str(checkpoint), "--output", str(tmp_path / "a.onnx"), "--height", "0"],
              "example_size")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.glob("a.*"))


@needs_data
def test_cli_export_then_predict_onnx_matches_checkpoint(tmp_path, capsys):
    """``pspnet.export`` on a tiny checkpoint, then ``pspnet.predict --onnx`` (config and colours from the model's
    metadata, no checkpoint) against ``pspnet.predict --checkpoint`` on CamVid images: the same label maps but
    at near-ties (pixels whose top two probabilities differ by < 1e-4)."""
    from pspnet.inference import predict_probs
    checkpoint = tiny_checkpoint(tmp_path, ["--scales", "0.75,1.0", "--flip"])
    model_path = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(model_path)]) == 0
    assert "wrote" in capsys.readouterr().out and model_path.is_file()
    images = sorted((DATA_ROOT / "val" / "images").iterdir())[:2]
    for source in (["--onnx", str(model_path)], ["--checkpoint", str(checkpoint), "--amp", "none"]):
        name = source[0].strip("-")
        assert predict_main([*map(str, images), *source, "--out-dir", str(tmp_path / name), "--no-progress"]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    model = PSPNet(layers=18, classes=11)
    model.load_state_dict(torch.load(checkpoint)["state_dict"])
    for image_path in images:
        onnx_ids, torch_ids = (cv2.imread(str(tmp_path / name / "label" / f"{image_path.stem}.png"),
                                          cv2.IMREAD_UNCHANGED) for name in ("onnx", "checkpoint"))
        assert (tmp_path / "onnx" / "pred" / f"{image_path.stem}.png").is_file()
        differ = onnx_ids != torch_ids
        if differ.any():
            image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
            probs = np.sort(predict_probs(model, image, 11, 96, (49, 65), (0.75, 1.0), True), axis=0)
            assert (probs[-1] - probs[-2])[differ].max() < 1e-4
        assert differ.mean() <= 1e-3
