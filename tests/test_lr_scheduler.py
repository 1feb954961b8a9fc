"""pspnet.lr_scheduler: semseg's poly LR as a torch LRScheduler, to the bit, and its restoration from
checkpoints with and without its state."""

import itertools

import pytest
import torch

from pspnet.checkpoint import load_checkpoint, save_checkpoint
from pspnet.lr_scheduler import PolyLR, restore_lr_scheduler


def semseg_poly_learning_rate(base_lr, curr_iter, max_iter, power=0.9):
    """semseg util/util.py (clamped at 0 from max_iter on, as the trainer always did)."""
    return base_lr * max(1.0 - curr_iter / max_iter, 0.0) ** power


def _optimizer(base_lr, head_lr_mult):
    """Two backbone groups (lr_mult 1) and one head group, as pspnet.optim.param_groups builds them."""
    mults = (1.0, 1.0, head_lr_mult)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_mult": m, "lr": base_lr * m} for m in mults]
    return torch.optim.SGD(groups, lr=base_lr, momentum=0.9)


def _lrs(optimizer):
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize("base_lr, head_lr_mult, power, max_iter",
                         list(itertools.product([0.01, 0.007], [10.0, 3.3], [0.9, 0.5], [630, 7])))
def test_poly_lr_is_semsegs_to_the_bit(base_lr, head_lr_mult, power, max_iter):
    """After every step: backbone groups at current_lr, head groups at current_lr * head_lr_mult (semseg
    tool/train.py), exactly; 0 from max_iter on."""
    opt = _optimizer(base_lr, head_lr_mult)
    sched = PolyLR(opt, base_lr, max_iter, power)
    assert _lrs(opt) == [base_lr, base_lr, base_lr * head_lr_mult]
    for it in range(1, max_iter + 3):
        opt.step()
        sched.step()
        current_lr = semseg_poly_learning_rate(base_lr, it, max_iter, power)
        assert _lrs(opt) == [current_lr, current_lr, current_lr * head_lr_mult], it
        assert sched.get_last_lr() == _lrs(opt) and sched.last_epoch == it
    assert _lrs(opt) == [0.0, 0.0, 0.0]


def test_state_dict_restores_the_position_under_the_new_schedule(tmp_path):
    """A checkpoint's scheduler state (weights_only-loadable) puts a resumed run at its iteration; a longer
    max_iter (epochs / max_iters may change on resume) then applies from there."""
    opt = _optimizer(0.01, 10.0)
    sched = PolyLR(opt, 0.01, 100)
    for _ in range(40):
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "s.pth", {"lr_scheduler": sched.state_dict()})
    state = load_checkpoint(tmp_path / "s.pth")["lr_scheduler"]
    for max_iter in (100, 250):
        resumed_opt = _optimizer(0.01, 10.0)
        resumed = PolyLR(resumed_opt, 0.01, max_iter)
        restore_lr_scheduler(resumed, state, iteration=40)
        lr = semseg_poly_learning_rate(0.01, 40, max_iter)
        assert resumed.last_epoch == 40 and resumed.max_iter == max_iter
        assert _lrs(resumed_opt) == resumed.get_last_lr() == [lr, lr, lr * 10.0]
        resumed_opt.step()
        resumed.step()
        assert resumed.get_last_lr()[0] == semseg_poly_learning_rate(0.01, 41, max_iter)


def test_checkpoint_without_scheduler_state_rebuilds_the_poly_position():
    """Checkpoints written before the schedule was saved resume at the poly LR of their iteration."""
    opt, straight_opt = _optimizer(0.02, 10.0), _optimizer(0.02, 10.0)
    straight = PolyLR(straight_opt, 0.02, 50)
    for _ in range(17):
        straight_opt.step()
        straight.step()
    sched = PolyLR(opt, 0.02, 50)
    restore_lr_scheduler(sched, None, iteration=17)
    assert _lrs(opt) == _lrs(straight_opt) and sched.last_epoch == 17
    for _ in range(5):
        for o, s in ((opt, sched), (straight_opt, straight)):
            o.step()
            s.step()
        assert _lrs(opt) == _lrs(straight_opt)
    other = torch.optim.lr_scheduler.LambdaLR(_optimizer(0.02, 10.0), lambda it: 1.0)
    with pytest.raises(ValueError, match="no LR scheduler state.*LambdaLR"):
        restore_lr_scheduler(other, None, iteration=17)


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_lr=0.0), "base_lr"),
    (dict(max_iter=0), "max_iter"),
    (dict(max_iter=10.0), "max_iter"),
    (dict(power=-0.1), "power"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolyLR(_optimizer(0.01, 10.0), **{"base_lr": 0.01, "max_iter": 10, **kwargs})
