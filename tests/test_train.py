"""pspnet.config, the semseg recipe pieces (optimizer, LR schedule, sampler, RNG state), and a tiny end-to-end
``python -m pspnet.train`` run on real CamVid images: log + checkpoints, exact resume, evaluation."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pspnet.checkpoint import load_checkpoint, save_checkpoint
from pspnet.config import ConfigError
from pspnet.config_files import load_config
from pspnet.lr_scheduler import build_lr_scheduler
from pspnet.modeling import build_model
from pspnet.optim import build_optimizer, param_groups
from pspnet.rng import get_rng_state, set_rng_state
from pspnet.sampler import EpochSampler
from pspnet.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = (REPO.parent / "shared" / "data" / "camvid").resolve()
CONFIG = REPO / "configs" / "camvid.yaml"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "classes.json").is_file(), reason="CamVid not available")


# ---------------------------------------------------------------------------- config

def test_camvid_yaml_loads_with_every_key_a_field():
    cfg = load_config(CONFIG)
    assert (cfg.layers, cfg.classes, cfg.batch_size, cfg.base_size) == (18, 11, 8, 240)
    assert cfg.scales == [1.0] and cfg.bins == [1, 2, 3, 6] and cfg.weight_decay == pytest.approx(1e-4)


def test_overrides_parse_by_field_type():
    cfg = load_config(CONFIG, ["--base_lr", "2e-2", "--no-fused", "--scales", "0.5,1.0,1.75", "--flip",
                               "--rotate_min=-20", "--rotate_max", "-5", "--bins", "[1, 2]", "--seed", "none",
                               "--max-iters", "3", "--cache_data", "false", "--resume", "auto"])
    assert cfg.base_lr == 0.02 and cfg.fused is False and cfg.flip is True and cfg.cache_data is False
    assert cfg.scales == [0.5, 1.0, 1.75] and cfg.bins == [1, 2]
    assert cfg.rotate_min == -20.0 and cfg.rotate_max == -5.0
    assert cfg.seed is None and cfg.max_iters == 3 and cfg.resume == "auto"
    assert load_config(None, ["--flip", "true", "--fused", "no"]).fused is False


@pytest.mark.parametrize("tokens,key", [
    (["--bogus", "1"], "bogus"),
    (["--base_lr", "fast"], "base_lr"),
    (["--flip", "maybe"], "flip"),
    (["--layers", "19"], "layers"),
    (["--layers", "1.5"], "layers"),
    (["--scales", "1,x"], "scales"),
    (["--batch_size", "1"], "batch_size"),
    (["--scale_min", "3"], "scale_min"),
    (["--epochs"], "epochs"),
    (["base_lr", "0.1"], "base_lr"),
    (["--data_root", "none", "--classes", "null"], "classes"),
])
def test_bad_overrides_name_the_key(tokens, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIG, tokens)


def test_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: 18\nbase_lrr: 0.1\n")
    with pytest.raises(ConfigError, match="base_lrr.*did you mean 'base_lr'"):
        load_config(bad)
    bad.write_text("layers: eighteen\n")
    with pytest.raises(ConfigError, match="layers"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    semseg_style = tmp_path / "semseg.yaml"  # semseg's sectioned files flatten
    semseg_style.write_text("DATA:\n  classes: 19\nTRAIN:\n  base_lr: 0.02\n  weight_decay: 1e-4\n")
    cfg = load_config(semseg_style)
    assert cfg.classes == 19 and cfg.base_lr == 0.02 and cfg.weight_decay == 1e-4


def test_train_cli_reports_bad_config(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(CONFIG), "--base_lr", "abc"])
    assert e.value.code == 2 and "base_lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------- recipe pieces

def test_param_groups_and_poly_schedule_follow_semseg():
    cfg = load_config(CONFIG, ["--base_lr", "0.01", "--head_lr_mult", "10", "--loss", "ce"])  # the model only
    model = build_model(cfg)
    groups = param_groups(model, cfg.head_lr_mult)
    assert [g["name"] for g in groups] == ["layer0", "layer1", "layer2", "layer3", "layer4", "ppm", "cls", "aux"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [0.01] * 5 + [0.1] * 3
    assert all(g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 for g in opt.param_groups)
    sched = build_lr_scheduler(opt, cfg, max_iter=100)
    for _ in range(25):
        opt.step()
        sched.step()
    lr = sched.get_last_lr()[0]
    assert lr == pytest.approx(0.01 * 0.75 ** 0.9)
    assert opt.param_groups[7]["lr"] == pytest.approx(10 * lr)
    assert sched.lr_at(100) == [0.0] * 8


def test_epoch_sampler_is_deterministic_and_skips():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10)) and full == EpochSampler(10, seed=3).permutation(2)
    assert full != s.permutation(3)
    s.set_epoch(2, skip=4)
    assert list(s) == full[4:] and len(s) == 6


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "r.pth", {"rng": get_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------------------- end to end

def _tiny(save_path, *extra):
    """6 CamVid images, batch 2 (3 iterations/epoch), 65x65 crops, 1 validation image at base 64."""
    return ["--config", str(CONFIG), "--data_root", str(DATA_ROOT), "--save_path", str(save_path),
            "--max_samples", "6", "--max_val_samples", "1", "--batch_size", "2", "--train_h", "65",
            "--train_w", "65", "--base_size", "64", "--test_h", "48", "--test_w", "64", "--log_freq", "1",
            "--keep_last", "1", "--threads", str(torch.get_num_threads()), "--no-progress", *extra]


def _rows(save_path, kind):
    lines = (Path(save_path) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@needs_data
def test_train_resume_and_evaluate_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    # 1) two iterations: stops mid-epoch, writes log.jsonl, final.pth, final_metrics.*
    assert train_main(_tiny(run, "--max_iters", "2")) == 0
    assert f"final checkpoint: {run / 'final.pth'}" in capsys.readouterr().out
    train_rows = _rows(run, "train")
    assert [r["iter"] for r in train_rows] == [1, 2]
    for key in ("epoch", "loss", "main_loss", "aux_loss", "lr", "images_per_s", "elapsed_s"):
        assert key in train_rows[0]
    assert train_rows[0]["lr"] == pytest.approx(0.01 * (1 - 1 / 2) ** 0.9)
    for r in train_rows:  # the criterion's total: main + aux_weight * aux
        assert r["loss"] == pytest.approx(r["main_loss"] + 0.4 * r["aux_loss"], rel=1e-6)
    val = _rows(run, "val")[-1]
    assert len(val["iou"]) == 11 and 0 <= val["miou"] <= 1
    state = load_checkpoint(run / "final.pth")
    assert state["iteration"] == 2 and state["epoch"] == 0 and state["metrics"]["miou"] == val["miou"]
    assert state["lr_scheduler"]["last_epoch"] == 2 and state["lr_scheduler"]["max_iter"] == 2
    assert json.loads((run / "final_metrics.json").read_text())["miou"] == val["miou"]

    # 2) a fresh run into the same folder is refused (nothing overwritten)
    before = (run / "final.pth").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        train_main(_tiny(run, "--max_iters", "2"))
    assert e.value.code == 2 and "--resume auto" in capsys.readouterr().err
    assert (run / "final.pth").stat().st_mtime_ns == before

    # 3) resume to 4 iterations: continues at iteration 3, crosses the epoch end (epoch_0001.pth)
    assert train_main(_tiny(run, "--max_iters", "4", "--resume", "auto")) == 0
    assert [r["iter"] for r in _rows(run, "train")] == [1, 2, 3, 4]
    assert (run / "epoch_0001.pth").is_file() and load_checkpoint(run / "epoch_0001.pth")["iteration"] == 3
    assert load_checkpoint(run / "final.pth")["iteration"] == 4
    assert "resumed from" in capsys.readouterr().out

    # 4) exact resume: 2 epochs straight vs. resuming the first run's epoch-1 checkpoint elsewhere
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    two_epochs = ["--max_samples", "4", "--epochs", "2", "--keep_last", "0"]  # 2 iterations per epoch
    assert train_main(_tiny(straight, *two_epochs)) == 0
    assert sorted(p.name for p in straight.glob("*.pth")) == ["epoch_0001.pth", "final.pth"]
    assert train_main(_tiny(resumed, *two_epochs, "--resume", str(straight / "epoch_0001.pth"))) == 0
    assert [r["iter"] for r in _rows(resumed, "train")] == [3, 4]
    a, b = load_checkpoint(straight / "final.pth"), load_checkpoint(resumed / "final.pth")
    assert b["iteration"] == a["iteration"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert b["metrics"]["miou"] == pytest.approx(a["metrics"]["miou"])

    # 4b) a checkpoint from before the LR scheduler was saved resumes exactly as one with its state
    old = load_checkpoint(straight / "epoch_0001.pth")
    assert old.pop("lr_scheduler")["last_epoch"] == 2
    for group in old["optimizer"]["param_groups"]:
        del group["initial_lr"]
    save_checkpoint(tmp_path / "old.pth", old)
    from_old = tmp_path / "from_old"
    assert train_main(_tiny(from_old, *two_epochs, "--resume", str(tmp_path / "old.pth"))) == 0
    assert [r["lr"] for r in _rows(from_old, "train")] == [r["lr"] for r in _rows(resumed, "train")]
    c = load_checkpoint(from_old / "final.pth")
    for k, v in b["state_dict"].items():
        assert torch.equal(c["state_dict"][k], v), k

    # 5) evaluate the trained checkpoint (stored config) from a subprocess, as a user would
    out_dir = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "pspnet.evaluate", "--checkpoint", str(run / "final.pth"),
                           "--save-dir", str(out_dir), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "mIoU/mAcc/allAcc" in proc.stdout
    assert json.loads((out_dir / "metrics.json").read_text())["images"] == 1
    assert len(list((out_dir / "pred").glob("*.png"))) == 1
    assert len(list((out_dir / "overlay").glob("*.png"))) == 1


@needs_data
def test_trainer_takes_another_lr_scheduler(tmp_path):
    """Trainer(lr_scheduler=factory): the factory's scheduler is stepped every iteration, saved and restored."""
    from pspnet.trainer import Trainer
    run = tmp_path / "run"
    tokens = _tiny(run)[2:-1]  # the config keys of _tiny (without --config and --no-progress)

    def constant(optimizer, max_iter):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)

    Trainer(load_config(CONFIG, [*tokens, "--max_iters", "2"]), progress=False, lr_scheduler=constant).run()
    state = load_checkpoint(run / "final.pth")
    assert state["lr_scheduler"]["last_epoch"] == 2 and "max_iter" not in state["lr_scheduler"]
    trainer = Trainer(load_config(CONFIG, [*tokens, "--max_iters", "3", "--resume", "auto"]), progress=False,
                      lr_scheduler=constant)
    assert trainer.lr_scheduler.last_epoch == 2
    trainer.run()
    assert [r["lr"] for r in _rows(run, "train")] == [0.01, 0.01, 0.01]
    assert load_checkpoint(run / "final.pth")["lr_scheduler"]["last_epoch"] == 3


@needs_data
def test_median_frequency_loss_weights_come_from_the_training_labels_and_stay_on_resume(tmp_path):
    """``--loss ce_median_freq``: the weights of the 6 training images' labels (to the config's
    class_weight_power), in the start row and the checkpoint; a resumed run keeps the checkpoint's weights."""
    from pspnet.data.camvid import CamVid
    from pspnet.loss import median_frequency_weights
    run = tmp_path / "run"
    assert train_main(_tiny(run, "--max_iters", "2", "--loss", "ce_median_freq")) == 0
    state = load_checkpoint(run / "final.pth")
    train = CamVid(DATA_ROOT, "train")
    expected = median_frequency_weights([train.label(i) for i in range(6)], 11, 255, power=0.5)   # camvid.yaml
    assert torch.allclose(torch.tensor(state["class_weights"]), expected, rtol=1e-6)
    assert _rows(run, "start")[0]["class_weights"] == state["class_weights"]
    assert train_main(_tiny(run, "--max_iters", "3", "--loss", "ce_median_freq", "--resume", "auto")) == 0
    assert load_checkpoint(run / "final.pth")["class_weights"] == state["class_weights"]
