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
