"""Tests for pspnet.models: semseg's PSPNet layout, an independent functional oracle, loss, errors.

The oracle (:func:`semseg_logits`) and the state_dict spec (:func:`semseg_spec`) are written here from
hszhao/semseg ``model/pspnet.py`` / ``model/resnet.py`` (see docs/semseg_parity.md, model and state_dict)
with ``torch.nn.functional`` calls only; they do not use any code from ``pspnet.models``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pspnet.models import (PSPNet, ResNet, load_state_dict, output_size, resnet18, resnet34, resnet50)
from pspnet.models.resnet import BasicBlock, Bottleneck, dilate_layer


BINS = (1, 2, 3, 6)
STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


# ----------------------------------------------------------------------------- independent semseg spec


def semseg_spec(layers: int, classes: int, bins=BINS) -> dict[str, tuple[int, ...]]:
    """Ordered ``key -> shape`` of semseg's PSPNet state_dict (docs/semseg_parity.md), built by hand."""
    spec: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        spec[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{name}.{s}"] = (c,)
        spec[f"{name}.num_batches_tracked"] = ()

    conv("layer0.0", 64, 3, 3); bn("layer0.1", 64)
    conv("layer0.3", 64, 64, 3); bn("layer0.4", 64)
    conv("layer0.6", 128, 64, 3); bn("layer0.7", 128)
    kind, counts = STAGES[layers]
    exp = 4 if kind == "bottleneck" else 1
    inplanes = 128
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), start=1):
        for i in range(n):
            p = f"layer{li}.{i}"
            if kind == "bottleneck":
                conv(f"{p}.conv1", planes, inplanes, 1); bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1); bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3); bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
            if i == 0 and (li > 1 or inplanes != planes * exp):
                conv(f"{p}.downsample.0", planes * exp, inplanes, 1); bn(f"{p}.downsample.1", planes * exp)
            inplanes = planes * exp
    fea = 512 * exp
    red = fea // len(bins)
    for i in range(len(bins)):
        conv(f"ppm.features.{i}.1", red, fea, 1); bn(f"ppm.features.{i}.2", red)
    for head, cin, mid in (("cls", 2 * fea, 512), ("aux", 256 * exp, 256)):
        conv(f"{head}.0", mid, cin, 3); bn(f"{head}.1", mid)
        spec[f"{head}.4.weight"] = (classes, mid, 1, 1)
        spec[f"{head}.4.bias"] = (classes,)
    return spec


def random_semseg_state(layers: int, classes: int, seed: int = 0, dtype=torch.float64) -> dict:
    """Random weights AND random BN running statistics in semseg's layout (non-trivial BN)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in semseg_spec(layers, classes).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(int(torch.randint(0, 1000, (), generator=g)), dtype=torch.long)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g, dtype=dtype) * math.sqrt(1.0 / fan_in)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g, dtype=dtype) * 1.5 + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = torch.randn(shape, generator=g, dtype=dtype) * 0.1
        else:  # BN gamma
            sd[key] = torch.rand(shape, generator=g, dtype=dtype) * 0.5 + 0.5
    return sd


# ----------------------------------------------------------------------------- independent oracle


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, momentum=0.0, eps=1e-5)


def semseg_logits(sd: dict, x: torch.Tensor, bins=BINS, zoom_factor: int = 8) -> torch.Tensor:
    """semseg's eval-mode PSPNet logits from a (prefix-free) state_dict, in torch.nn.functional calls.

    Stem: 3x3 s2 / 3x3 / 3x3 (pad 1) + BN + ReLU, maxpool(3, 2, 1). layer2 block 0 strides 2 (Bottleneck:
    on conv2; BasicBlock: on conv1); layer3 / layer4: every 3x3 conv dilation = padding = 2 / 4, stride 1,
    downsample stride 1. PPM: cat(x, up(b=1), up(2), up(3), up(6)), align_corners=True. cls, then bilinear
    (align_corners=True) to (H, W) for zoom 8, else to (H-1)//8*zoom+1.
    """
    H, W = x.shape[2:]
    h, w = (H, W) if zoom_factor == 8 else ((H - 1) // 8 * zoom_factor + 1, (W - 1) // 8 * zoom_factor + 1)
    y = F.relu(_bn(F.conv2d(x, sd["layer0.0.weight"], stride=2, padding=1), sd, "layer0.1"))
    y = F.relu(_bn(F.conv2d(y, sd["layer0.3.weight"], padding=1), sd, "layer0.4"))
    y = F.relu(_bn(F.conv2d(y, sd["layer0.6.weight"], padding=1), sd, "layer0.7"))
    y = F.max_pool2d(y, kernel_size=3, stride=2, padding=1)
    bottleneck = "layer1.0.conv3.weight" in sd
    for li, (stride, dil) in enumerate(((1, 1), (2, 1), (1, 2), (1, 4)), start=1):
        i = 0
        while f"layer{li}.{i}.conv1.weight" in sd:
            p = f"layer{li}.{i}"
            s = stride if i == 0 else 1
            if bottleneck:
                out = F.relu(_bn(F.conv2d(y, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                out = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=dil, dilation=dil),
                                 sd, f"{p}.bn2"))
                out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            else:
                out = F.relu(_bn(F.conv2d(y, sd[f"{p}.conv1.weight"], stride=s, padding=dil, dilation=dil),
                                 sd, f"{p}.bn1"))
                out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=dil, dilation=dil), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                res = _bn(F.conv2d(y, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            else:
                res = y
            y = F.relu(out + res)
            i += 1
    size = y.shape[2:]
    parts = [y]
    for k, b in enumerate(bins):
        t = F.adaptive_avg_pool2d(y, b)
        t = F.relu(_bn(F.conv2d(t, sd[f"ppm.features.{k}.1.weight"]), sd, f"ppm.features.{k}.2"))
        parts.append(F.interpolate(t, size=size, mode="bilinear", align_corners=True))
    y = torch.cat(parts, 1)
    y = F.relu(_bn(F.conv2d(y, sd["cls.0.weight"], padding=1), sd, "cls.1"))
    y = F.conv2d(y, sd["cls.4.weight"], sd["cls.4.bias"])
    if tuple(y.shape[2:]) != (h, w):
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)
    return y


def _assert_close(actual, expected, rtol=1e-10):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def psp50_state():
    return random_semseg_state(50, classes=7, seed=1)


@pytest.fixture(scope="module")
def psp18_pair():
    """(fused, unfused) PSPNet-18 in float64 with identical random weights and BN statistics."""
    torch.manual_seed(0)
    sd = random_semseg_state(18, classes=5, seed=2)
    models = []
    for fused in (True, False):
        m = PSPNet(layers=18, classes=5, fused=fused).double()
        load_state_dict(m, sd)
        models.append(m)
    return models[0], models[1], sd


# ----------------------------------------------------------------------------- layout


def test_pspnet50_state_dict_layout():
    m = PSPNet(layers=50, classes=150)
    sd = m.state_dict()
    assert len(sd) == 370
    spec = semseg_spec(50, 150)
    assert list(sd) == list(spec)  # same keys in semseg's order
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec
    assert tuple(sd["layer0.0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["layer1.0.conv1.weight"].shape) == (64, 128, 1, 1)
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 128, 1, 1)
    for i in range(4):
        assert tuple(sd[f"ppm.features.{i}.1.weight"].shape) == (512, 2048, 1, 1)
    assert tuple(sd["cls.0.weight"].shape) == (512, 4096, 3, 3)
    assert tuple(sd["cls.4.weight"].shape) == (150, 512, 1, 1)
    assert tuple(sd["aux.0.weight"].shape) == (256, 1024, 3, 3)
    assert tuple(sd["aux.4.bias"].shape) == (150,)
    assert not any(k.startswith(("fc", "avgpool")) or ".fc." in k for k in sd)
    # semseg PSPNet-50: 49.18 M parameters with C = 150, aux 2.40 M
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == 49.18
    assert round(sum(p.numel() for p in m.aux.parameters()) / 1e6, 2) == 2.40
    # layer0 is semseg's Sequential with one shared ReLU at 2, 5, 8
    assert len(m.layer0) == 10
    assert m.layer0[2] is m.layer0[5] is m.layer0[8]
    assert isinstance(m.layer0[9], nn.MaxPool2d)
    assert isinstance(m.criterion, nn.CrossEntropyLoss) and m.criterion.ignore_index == 255
    assert m.criterion.aux_weight == pytest.approx(0.4)


def test_pspnet_is_exported_by_the_package():
    import pspnet
    assert pspnet.PSPNet is PSPNet and "PSPNet" in pspnet.__all__
    assert not hasattr(PSPNet, "backbone_modules") and not hasattr(PSPNet, "head_modules")


def test_pspnet101_state_dict_layout():
    m = PSPNet(layers=101, classes=150, fused=False)
    sd = m.state_dict()
    assert len(sd) == 676
    assert {k: tuple(v.shape) for k, v in sd.items()} == semseg_spec(101, 150)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == 68.17


@pytest.mark.parametrize("layers", [18, 34])
def test_basicblock_state_dict_layout(layers):
    m = PSPNet(layers=layers, classes=3)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == semseg_spec(layers, 3)
    assert tuple(m.state_dict()["aux.0.weight"].shape) == (256, 256, 3, 3)
    assert tuple(m.state_dict()["cls.0.weight"].shape) == (512, 1024, 3, 3)


def test_resnet_builders():
    r = resnet50()
    assert isinstance(r.layer1[0], Bottleneck) and r.inplanes == 2048
    assert [len(getattr(r, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert r.layer2[0].conv2.stride == (2, 2) and r.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert tuple(r.fc.weight.shape) == (1000, 2048)
    assert r(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    r = resnet18(num_classes=None).eval()
    assert isinstance(r.layer1[0], BasicBlock) and r.layer1[0].downsample is not None  # 128 -> 64
    assert r.fc is None and r(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    r = resnet34(deep_base=False, num_classes=10)
    assert tuple(r.conv1.weight.shape) == (64, 3, 7, 7) and not hasattr(r, "conv3")
    assert [len(getattr(r, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # init: kaiming_normal(fan_out) convs, BN gamma 1 beta 0
    r = resnet18(num_classes=None)
    assert torch.all(r.bn1.weight == 1) and torch.all(r.bn1.bias == 0)
    w = r.layer4[0].conv2.weight  # fan_out = 512 * 9
    assert abs(w.std().item() / math.sqrt(2.0 / (512 * 9)) - 1) < 0.05
    with pytest.raises(TypeError):
        resnet50(True)  # keyword-only: semseg's positional argument was `pretrained`
    with pytest.raises(ValueError, match="layers"):
        ResNet(Bottleneck, [3, 4, 6])
    with pytest.raises(ValueError, match="dilation"):
        dilate_layer(r.layer3, 0)


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("fused", [True, False])
def test_semseg_checkpoint_matches_functional_oracle(psp50_state, fused, tmp_path):
    sd = psp50_state
    ckpt = {"epoch": 100, "state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}}
    path = tmp_path / "train_epoch_100.pth"
    torch.save(ckpt, path)
    m = PSPNet(layers=50, classes=7, fused=fused).double().eval()
    if fused:
        result = load_state_dict(m, torch.load(path, weights_only=True))
    else:
        result = load_state_dict(m, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(m.state_dict()["layer4.2.bn3.running_var"], sd["layer4.2.bn3.running_var"])
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 33, 33), (1, 3, 30, 45)]:  # 8k+1 (semseg's domain) and not 8k+1
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ours = m(x)
        expected = semseg_logits(sd, x)
        assert ours.shape == (shape[0], 7, shape[2], shape[3]) and ours.dtype == torch.float64
        assert expected.abs().max() > 1e-3  # the oracle's output is not trivially zero
        _assert_close(ours, expected)


def test_basicblock_matches_functional_oracle(psp18_pair):
    fused, unfused, sd = psp18_pair
    fused.eval(), unfused.eval()
    g = torch.Generator().manual_seed(4)
    for shape, zoom in [((2, 3, 33, 41), 8), ((1, 3, 30, 45), 8), ((2, 3, 41, 33), 4), ((1, 3, 30, 45), 1)]:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        expected = semseg_logits(sd, x, zoom_factor=zoom)
        for m in (fused, unfused):
            m.zoom_factor = zoom
            with torch.no_grad():
                _assert_close(m(x), expected)
            m.zoom_factor = 8


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("hw", [(33, 41), (30, 45), (17, 17), (1, 1)])
def test_output_stride_8_and_sizes(hw):
    m = PSPNet(layers=18, classes=3, fused=False).eval()
    seen = {}
    hooks = [getattr(m, name).register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, tuple(out.shape[2:])))
        for name in ("layer0", "layer3", "layer4")]
    H, W = hw
    f = ((H - 1) // 8 + 1, (W - 1) // 8 + 1)
    for zoom in (1, 2, 4, 8):
        m.zoom_factor = zoom
        with torch.no_grad():
            out = m(torch.randn(1, 3, H, W))
        assert seen["layer4"] == f and seen["layer3"] == f
        expected = (H, W) if zoom == 8 else ((H - 1) // 8 * zoom + 1, (W - 1) // 8 * zoom + 1)
        assert tuple(out.shape) == (1, 3, *expected) == (1, 3, *output_size(H, W, zoom))
    for h in hooks:
        h.remove()


def test_dilation_surgery():
    m = PSPNet(layers=50, classes=2, fused=False)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].downsample[0].stride == (2, 2)
    for layer, d in ((m.layer3, 2), (m.layer4, 4)):
        for blk in layer:  # all blocks, block 0 included
            assert blk.conv2.dilation == (d, d) and blk.conv2.padding == (d, d) and blk.conv2.stride == (1, 1)
            assert blk.conv1.stride == (1, 1) and blk.conv3.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    for layer in (m.layer1, m.layer2):
        for blk in layer:
            assert blk.conv2.dilation == (1, 1)
    m = PSPNet(layers=18, classes=2, fused=False)
    for layer, d in ((m.layer3, 2), (m.layer4, 4)):
        for blk in layer:
            for conv in (blk.conv1, blk.conv2):
                assert conv.dilation == (d, d) and conv.padding == (d, d) and conv.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    assert m.layer2[0].conv1.stride == (2, 2)


# ----------------------------------------------------------------------------- train mode, loss


def test_train_tuple_and_full_resolution_loss():
    torch.manual_seed(0)
    m = PSPNet(layers=18, classes=4, dropout=0.0, fused=False).double().train()
    aux_raw = {}
    m.aux.register_forward_hook(lambda mod, inp, out: aux_raw.__setitem__("v", out))
    x = torch.randn(2, 3, 33, 41, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 33, 41))
    y[0, :10, :] = 255
    y[1, :, :5] = 255
    logits = m(x)  # train mode without y: logits (batch statistics; no dropout)
    assert logits.shape == (2, 4, 33, 41)
    pred, main_loss, aux_loss = m(x, y.to(torch.int32))  # any integer dtype
    assert pred.dtype == torch.int64 and pred.shape == (2, 33, 41)
    assert torch.equal(pred, logits.argmax(1))
    assert main_loss.dim() == 0 and aux_loss.dim() == 0

    def hand_ce(z):
        logp = torch.log_softmax(z, 1)
        valid = y != 255
        picked = logp.gather(1, y.clamp(max=3).unsqueeze(1)).squeeze(1)
        return -(picked * valid).sum() / valid.sum()

    _assert_close(main_loss, hand_ce(logits), rtol=1e-12)
    assert aux_raw["v"].shape[2:] == (5, 6)  # the aux head runs on stride-8 layer3 features
    aux_full = F.interpolate(aux_raw["v"], size=(33, 41), mode="bilinear", align_corners=True)
    _assert_close(aux_loss, hand_ce(aux_full), rtol=1e-12)

    # ignored pixels contribute nothing: the loss gradient w.r.t. their logits is exactly zero
    logits = logits.detach().requires_grad_(True)
    m.criterion(logits, y).backward()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[y == 255] == 0)
    assert logits.grad.permute(0, 2, 3, 1)[y != 255].abs().sum() > 0

    # eval mode ignores y and returns logits
    m.eval()
    out = m(x, y)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 33, 41)


def test_ignore_index_pixels_do_not_change_loss():
    torch.manual_seed(1)
    m = PSPNet(layers=18, classes=3, dropout=0.0, fused=False).double().train()
    x = torch.randn(2, 3, 25, 25, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 25, 25))
    y[:, 5:15, 5:15] = 255
    _, main_a, aux_a = m(x, y)
    # the same valid pixels, loss recomputed over the valid set only
    logits = m(x)
    valid = y != 255
    ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], y[valid])
    _assert_close(main_a, ce, rtol=1e-12)
    y_zoom = torch.randint(0, 3, (2, 13, 13))
    m.zoom_factor = 4
    pred, main_z, _ = m(x, y_zoom)  # zoom 4: loss at (25-1)//8*4+1 = 13
    assert pred.shape == (2, 13, 13) and torch.isfinite(main_z)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = PSPNet(layers=18, classes=3, fused=False).train()
    x = torch.randn(2, 3, 33, 33)
    y = torch.randint(0, 3, (2, 33, 33))
    pred, main_loss, aux_loss = m(x, y)
    m.criterion.combine(main_loss, aux_loss).total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fused_matches_unfused(psp18_pair):
    fused, unfused, _ = psp18_pair
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 33, 41, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 33, 41), generator=g)
    y[:, :4] = 255
    fused.eval(), unfused.eval()
    with torch.no_grad():
        _assert_close(fused(x), unfused(x))
    # train mode (batch statistics, dropout with the same seed), losses and every gradient
    fused_state = {k: v.clone() for k, v in fused.state_dict().items()}
    unfused_state = {k: v.clone() for k, v in unfused.state_dict().items()}
    results = []
    for m in (fused, unfused):
        m.train()
        m.zero_grad()
        torch.manual_seed(123)
        pred, main_loss, aux_loss = m(x, y)
        m.criterion.combine(main_loss, aux_loss).total.backward()
        results.append((pred, main_loss, aux_loss, {n: p.grad.clone() for n, p in m.named_parameters()},
                        {k: v.clone() for k, v in m.state_dict().items()}))
        m.zero_grad()
        m.eval()
    (pf, mf, af, gf, sf), (pu, mu, au, gu, su) = results
    # the fused head's HeadConv holds semseg's cls.0.weight as two parameters: compare their concat
    gf["cls.0.weight"] = torch.cat([gf.pop("cls.0.weight_x"), gf.pop("cls.0.weight_branches")], dim=1)
    assert set(gf) == set(gu)
    assert torch.equal(pf, pu)
    _assert_close(mf, mu)
    _assert_close(af, au)
    for name in gu:
        _assert_close(gf[name], gu[name], rtol=1e-9)
    for key in su:  # running statistics updated identically by the PPM BN
        if su[key].is_floating_point():
            _assert_close(sf[key], su[key])
        else:
            assert torch.equal(sf[key], su[key]), key
    assert not torch.equal(sf["ppm.features.3.2.running_mean"], fused_state["ppm.features.3.2.running_mean"])
    fused.load_state_dict(fused_state)
    unfused.load_state_dict(unfused_state)


def test_eval_output_in_the_inputs_layout(psp18_pair):
    """In eval mode on CPU the fused model runs channels_last whatever its input; the logits come back in the
    input's memory format, with the values of the channels_last run."""
    fused, unfused, _ = psp18_pair
    fused.eval(), unfused.eval()
    x = torch.randn(1, 3, 33, 41, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, out_cl = fused(x), fused(x_cl)
        ref = unfused(x)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_cl)
    _assert_close(out, ref)


def test_batch_of_one_eval():
    m = PSPNet(layers=18, classes=2).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 33, 41))
    assert out.shape == (1, 2, 33, 41) and torch.isfinite(out).all()
    m.train()
    with pytest.raises(ValueError, match="batch size"):
        m(torch.randn(1, 3, 33, 41))


# ----------------------------------------------------------------------------- errors, loading


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(layers=20), ValueError, "layers"),
    (dict(layers=50.0), TypeError, "layers"),
    (dict(bins=(1, 2, 3)), ValueError, "divisible"),
    (dict(bins=()), ValueError, "bins"),
    (dict(bins=(1, 1)), ValueError, "bins"),
    (dict(bins=(0, 2)), ValueError, "bins"),
    (dict(zoom_factor=3), ValueError, "zoom_factor"),
    (dict(classes=0), ValueError, "classes"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(criterion="ce"), TypeError, "criterion"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PSPNet(**{"layers": 18, **kwargs})


def test_bad_inputs():
    m = PSPNet(layers=18, classes=2, fused=False).train()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 17, 17))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 4, 17, 17))
    with pytest.raises(TypeError, match="x"):
        m(torch.zeros(2, 3, 17, 17, dtype=torch.long))
    x = torch.randn(2, 3, 17, 17)
    with pytest.raises(ValueError, match="y"):
        m(x, torch.zeros(2, 16, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="y"):
        m(x, torch.zeros(2, 1, 17, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="y"):
        m(x, torch.zeros(2, 17, 17))
    m.zoom_factor = 2
    with pytest.raises(ValueError, match=r"y must have shape \[N, h, w\] = \[2, 5, 5\]"):
        m(x, torch.zeros(2, 17, 17, dtype=torch.long))


def test_load_state_dict_variants_and_errors():
    src = PSPNet(layers=18, classes=3, fused=False)
    dst = PSPNet(layers=18, classes=3, fused=True)
    sd = src.state_dict()
    for state in (sd, {"module." + k: v for k, v in sd.items()}):
        res = load_state_dict(dst, state)
        assert res.missing_keys == [] and res.unexpected_keys == []
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    # old checkpoints without num_batches_tracked load
    load_state_dict(dst, {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})

    before = {k: v.clone() for k, v in dst.state_dict().items()}
    bad = dict(sd)
    del bad["cls.4.bias"], bad["layer1.0.conv1.weight"]
    bad["fc.weight"] = torch.zeros(1000, 512)
    bad["cls.4.weight"] = torch.zeros(9, 512, 1, 1)
    with pytest.raises(RuntimeError) as err:
        load_state_dict(dst, bad)
    msg = str(err.value)
    assert "missing keys (2)" in msg and "cls.4.bias" in msg and "layer1.0.conv1.weight" in msg
    assert "unexpected keys (1)" in msg and "fc.weight" in msg
    assert "shape mismatches (1)" in msg and "cls.4.weight: checkpoint [9, 512, 1, 1] vs model [3, 512, 1, 1]" in msg
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())  # untouched on error
    # listing is truncated to the first 10
    many = {k: v for k, v in sd.items() if not k.startswith("layer1")}
    with pytest.raises(RuntimeError, match=r"missing keys \(\d+\): .*\(\d+ more\)"):
        load_state_dict(dst, many)
    # strict=False loads the intersection but still refuses shape mismatches
    res = load_state_dict(dst, {k: v for k, v in sd.items() if k != "cls.4.bias"} | {"x.y": torch.zeros(1)},
                          strict=False)
    assert res.missing_keys == ["cls.4.bias"] and res.unexpected_keys == ["x.y"]
    with pytest.raises(RuntimeError, match="shape"):
        load_state_dict(dst, {"cls.4.bias": torch.zeros(4)}, strict=False)
    with pytest.raises(TypeError):
        load_state_dict(dst, 3)


@pytest.mark.parametrize("deep_stem", [True, False], ids=["semseg_deep_stem", "torchvision_stem"])
def test_load_backbone_imagenet_formats(tmp_path, deep_stem):
    """ImageNet ResNet weights in semseg's deep-stem format (conv1..bn3) or torchvision's (7x7 conv1)
    land in layer0..layer4 exactly; fc is ignored; the heads are untouched; a format mismatch names keys."""
    from pspnet.models import ResNet, load_backbone
    from pspnet.models.resnet import RESNET_BLOCKS
    torch.manual_seed(0)
    imagenet = ResNet(RESNET_BLOCKS[18][0], RESNET_BLOCKS[18][1], num_classes=1000, deep_base=deep_stem)
    with torch.no_grad():
        for p in imagenet.parameters():
            p.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, path)
    model = PSPNet(layers=18, classes=5, deep_stem=deep_stem)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("ppm", "cls", "aux"))}
    assert load_backbone(model, path) == ([], [])
    src = imagenet.state_dict()
    stem = {"layer0.0": "conv1", "layer0.1": "bn1", "layer0.3": "conv2", "layer0.4": "bn2", "layer0.6": "conv3",
            "layer0.7": "bn3"}
    for key, value in model.state_dict().items():
        top, _, rest = key.partition(".")
        if top in ("ppm", "cls", "aux"):
            assert torch.equal(value, head_before[key]), key
            continue
        layer_key = key.split(".", 2)
        name = f"{stem['.'.join(layer_key[:2])]}.{layer_key[2]}" if top == "layer0" else key
        assert torch.equal(value, src[name]), key
    wrong = PSPNet(layers=18, classes=5, deep_stem=not deep_stem)
    with pytest.raises(RuntimeError, match="cannot load state_dict into PSPNet"):
        load_backbone(wrong, path)
