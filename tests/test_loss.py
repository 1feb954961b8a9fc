"""pspnet.loss: the run's loss built from the config, semseg's cross-entropy with the ignore index, and the
aux weighting the trainer back-propagates."""

import pytest
import torch
import torch.nn as nn

from pspnet import PSPNet
from pspnet.config import ConfigError
from pspnet.config_files import load_config
from pspnet.loss import LossParts, PSPLoss, build_criterion, median_frequency_weights
from pspnet.modeling import build_model


def _logits_and_target(dtype=torch.float64, ignore=255):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, 9, generator=g, dtype=dtype)
    target = torch.randint(0, 5, (2, 7, 9), generator=g)
    target[0, :3] = ignore
    return logits, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_is_semsegs_cross_entropy_to_the_bit(dtype):
    """semseg tool/train.py: criterion = nn.CrossEntropyLoss(ignore_index=args.ignore_label)."""
    logits, target = _logits_and_target(dtype)
    semseg = nn.CrossEntropyLoss(ignore_index=255)
    assert torch.equal(PSPLoss()(logits, target), semseg(logits, target))
    assert isinstance(PSPLoss(), nn.CrossEntropyLoss) and PSPLoss().state_dict() == {}


def test_combine_is_semsegs_total():
    """semseg tool/train.py: loss = main_loss + args.aux_weight * aux_loss."""
    main, aux = torch.tensor(1.2345, dtype=torch.float64), torch.tensor(0.6789, dtype=torch.float64)
    parts = PSPLoss(aux_weight=0.4).combine(main, aux)
    assert isinstance(parts, LossParts) and parts.main is main and parts.aux is aux
    assert torch.equal(parts.total, main + 0.4 * aux)
    assert torch.equal(torch.stack(parts), torch.stack([main + 0.4 * aux, main, aux]))


def test_criterion_comes_from_the_config_and_reaches_the_model():
    cfg = load_config(None, ["--aux_weight", "0.25"])
    criterion = build_criterion(cfg)
    assert (criterion.ignore_index, criterion.aux_weight) == (255, 0.25)
    assert build_model(cfg, criterion).criterion is criterion
    assert build_model(cfg).criterion.aux_weight == 0.25
    assert "ignore_index=255, aux_weight=0.25" in repr(criterion)


def test_model_losses_use_the_criterion_it_is_given():
    """PSPNet's (pred, main_loss, aux_loss) come from its criterion: here one ignoring class 0."""
    torch.manual_seed(0)
    criterion = PSPLoss(ignore_index=0, aux_weight=0.0)
    m = PSPNet(layers=18, classes=3, dropout=0.0, fused=False, criterion=criterion).double().train()
    x = torch.randn(2, 3, 25, 25, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 25, 25))
    torch.manual_seed(1)
    _, main_loss, aux_loss = m(x, y)
    torch.manual_seed(1)
    logits = m(x)
    assert torch.equal(main_loss, nn.CrossEntropyLoss(ignore_index=0)(logits, y))
    assert torch.equal(m.criterion.combine(main_loss, aux_loss).total, main_loss)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(aux_weight=-1.0), ValueError, "aux_weight"),
    (dict(aux_weight=float("inf")), ValueError, "aux_weight"),
    (dict(aux_weight=float("nan")), ValueError, "aux_weight"),
    (dict(aux_weight=True), ValueError, "aux_weight"),
    (dict(ignore_index=2.5), TypeError, "ignore_index"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PSPLoss(**kwargs)


# ---------------------------------------------------------------------------- loss: ce_median_freq

def test_median_frequency_weights_by_hand():
    """Two 2x3 maps (255 = void): class 0 in both (6 of 11 labelled pixels), class 1 only in the first (2 of its
    5), class 2 only in the second (3 of 6), class 3 nowhere. freq = 6/11, 2/5, 3/6; median 1/2."""
    first = torch.tensor([[0, 0, 1], [1, 0, 255]]).numpy()
    second = torch.tensor([[0, 0, 0], [2, 2, 2]]).numpy()
    weights = median_frequency_weights([first, second], classes=4, ignore_index=255)
    expected = torch.tensor([0.5 / (6 / 11), 0.5 / (2 / 5), 0.5 / (3 / 6), 0.0])
    assert weights.dtype == torch.float32 and torch.allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize("labels,match", [([torch.full((2, 2), 255).numpy()], "no labelled pixel"),
                                          ([torch.tensor([[0, 4]]).numpy()], r"\[0, 4\) or 255, got 0..4")])
def test_median_frequency_weights_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        median_frequency_weights(labels, classes=4, ignore_index=255)


def test_weighted_loss_is_torchs_weighted_cross_entropy_and_leaves_the_state_dict_alone():
    logits, target = _logits_and_target()
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25])
    criterion = PSPLoss(class_weights=weights)
    expected = nn.CrossEntropyLoss(weight=weights.double(), ignore_index=255)(logits, target)
    assert torch.allclose(criterion.double()(logits, target), expected, rtol=1e-12)
    assert criterion.state_dict() == {} and "class_weights=[0.5, 2.0, 1.0, 3.0, 0.25]" in repr(criterion)
    model = PSPNet(layers=18, classes=5, criterion=PSPLoss(class_weights=weights))
    assert set(model.state_dict()) == set(PSPNet(layers=18, classes=5).state_dict())   # semseg's keys only
    with pytest.raises(ValueError, match="class_weights"):
        PSPLoss(class_weights=torch.tensor([1.0, -1.0]))


def test_config_loss_key_needs_weights_exactly_for_median_freq():
    cfg = load_config(None, ["--loss", "ce_median_freq"])
    weights = torch.ones(cfg.classes)
    assert torch.equal(build_criterion(cfg, weights).weight, weights)
    with pytest.raises(ValueError, match="ce_median_freq needs class weights"):
        build_criterion(cfg)
    with pytest.raises(ValueError, match="ce takes no class weights"):
        build_criterion(load_config(None, []), weights)
    with pytest.raises(ConfigError, match="loss"):
        load_config(None, ["--loss", "focal"])


def test_median_frequency_weights_power_softens_the_balancing():
    """``power`` is the exponent of SegNet's weights: 0.5 their square root, 0 no weighting (absent classes 0)."""
    maps = [torch.tensor([[0, 0, 1], [1, 0, 255]]).numpy(), torch.tensor([[0, 0, 0], [2, 2, 2]]).numpy()]
    full = median_frequency_weights(maps, classes=4, ignore_index=255)
    assert torch.allclose(median_frequency_weights(maps, 4, 255, power=0.5), full.sqrt(), rtol=1e-6)
    assert torch.equal(median_frequency_weights(maps, 4, 255, power=0.0), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="power"):
        median_frequency_weights(maps, 4, 255, power=-1.0)
    with pytest.raises(ConfigError, match="class_weight_power"):
        load_config(None, ["--class_weight_power", "-0.5"])


# ---------------------------------------------------------------------------- OHEM

def _ohem_case():
    """6 labelled pixels and a void one; true-class probabilities > 0.98 (easy: 0, then 1), ~0.6 (2, 3), ~0.2 (4, 5)."""
    logits = torch.zeros(1, 3, 1, 7, dtype=torch.float64)
    target = torch.tensor([[[0, 1, 2, 0, 1, 2, 255]]])
    for pixel, margin in enumerate([6.0, 5.0, 1.2, 1.2, -0.9, -0.9, 0.0]):
        if pixel < 6:
            logits[0, target[0, 0, pixel], 0, pixel] = margin
    return logits, target


@pytest.mark.parametrize("min_kept,kept", [(1, [2, 3, 4, 5]), (5, [1, 2, 3, 4, 5]), (100, [0, 1, 2, 3, 4, 5])])
def test_ohem_keeps_the_hard_pixels_at_least_min_kept(min_kept, kept):
    """mmseg's OHEMPixelSampler: pixels with true-class probability <= max(0.7, the min_kept-th smallest)."""
    logits, target = _ohem_case()
    probs = logits.softmax(1).gather(1, (target * (target != 255)).unsqueeze(1)).squeeze()
    assert probs[1] < probs[0] and probs[:2].min() > 0.98 and 0.5 < probs[2] < 0.7 and probs[4] < 0.3
    hard = torch.full_like(target, 255)
    hard[0, 0, kept] = target[0, 0, kept]
    logits = logits.requires_grad_()
    loss = PSPLoss(ohem_thresh=0.7, ohem_min_kept=min_kept)(logits, target)
    assert torch.allclose(loss, nn.CrossEntropyLoss(ignore_index=255)(logits, hard), rtol=1e-12)
    loss.backward()
    easy = [p for p in range(7) if p not in kept]
    assert logits.grad[0, :, 0, easy].abs().max() == 0 and logits.grad[0, :, 0, kept].abs().min() > 0


def test_ohem_with_class_weights_and_bad_arguments():
    logits, target = _ohem_case()
    weights = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    hard = target.clone()
    hard[0, 0, :2] = 255
    got = PSPLoss(class_weights=weights, ohem_thresh=0.7, ohem_min_kept=1).double()(logits, target)
    assert torch.allclose(got, nn.CrossEntropyLoss(weight=weights, ignore_index=255)(logits, hard), rtol=1e-12)
    everything_void = torch.full_like(target, 255)
    assert PSPLoss(ohem_thresh=0.7)(logits, everything_void).isnan()   # as the plain loss: 0 / 0
    for kwargs, match in [({"ohem_thresh": 0.0}, "ohem_thresh"), ({"ohem_thresh": 1.5}, "ohem_thresh"),
                          ({"ohem_thresh": 0.7, "ohem_min_kept": 0}, "ohem_min_kept")]:
        with pytest.raises(ValueError, match=match):
            PSPLoss(**kwargs)
    cfg = load_config(None, ["--ohem_thresh", "0.7", "--ohem_min_kept", "5000"])
    criterion = build_criterion(cfg)
    assert (criterion.ohem_thresh, criterion.ohem_min_kept) == (0.7, 5000) and "ohem_thresh=0.7" in repr(criterion)
    with pytest.raises(ConfigError, match="ohem_thresh"):
        load_config(None, ["--ohem_thresh", "2"])
