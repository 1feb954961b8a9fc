"""The command line generated from TrainConfig's fields (pspnet.config_cli), the field metadata (help text,
"may change on resume") and how YAML / checkpoint values are read (pspnet.config, pspnet.config_files)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pspnet.config import ConfigError, TrainConfig, field_help, resume_free_keys
from pspnet.config_cli import ConfigArgumentParser, config_overrides, parse_overrides
from pspnet.config_files import checkpoint_config, load_config
from pspnet.evaluate import build_parser as evaluate_parser
from pspnet.predict import build_parser as predict_parser
from pspnet.train import build_parser as train_parser
from pspnet.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _squeeze(text):
    return "".join(text.split())  # argparse wraps help text (also at hyphens)


@pytest.mark.parametrize("build_parser", [train_parser, evaluate_parser, predict_parser])
def test_help_lists_every_key_with_its_help(build_parser):
    text = _squeeze(build_parser().format_help())
    for name in FIELDS:
        assert f"--{name}" in text and _squeeze(field_help(name)) in text, name
    assert _squeeze("--no-fused sets it to false.") in text
    assert _squeeze("Default: 0.5,0.75") not in text and _squeeze("Default: 1.0. May change on resume.") in text


def test_train_help_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "pspnet.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(f"--{name}" in proc.stdout for name in FIELDS)


def test_resume_free_keys_come_from_the_field_metadata():
    assert resume_free_keys() == {
        "resume", "overwrite", "max_iters", "epochs", "eval_freq", "save_freq", "keep_last", "log_freq", "workers",
        "threads", "keep_freed_memory", "cache_data", "max_val_samples", "batch_size_val", "base_size", "test_h",
        "test_w", "scales", "flip", "window_batch", "save_path", "data_root", "backbone_weights", "device"}
    for f in dataclasses.fields(TrainConfig):
        assert set(f.metadata) == {"help", "resume_free"} and f.metadata["help"].endswith("."), f.name


def test_command_line_syntax():
    values = parse_overrides(["--max-iters", "3", "--no_fused", "--no-deep-stem", "--cache_data=false", "--flip",
                              "--scales=0.5,1", "--bins", "[1, 2]", "--seed", "none", "--threads=null",
                              "--rotate_min", "-20", "--amp", "bf16", "--sync_bn"])
    assert values == {"max_iters": 3, "fused": False, "deep_stem": False, "cache_data": False, "flip": True,
                      "scales": [0.5, 1.0], "bins": [1, 2], "seed": None, "threads": None, "rotate_min": -20.0,
                      "amp": "bf16", "sync_bn": True}
    assert parse_overrides(["--fused", "--no-fused"]) == {"fused": False}  # the last one wins
    assert parse_overrides({"base_lr": 0.02}) == {"base_lr": 0.02}
    args = train_parser().parse_args(["--config", "c.yaml", "--no-progress", "--epochs", "2"])
    assert (args.config, args.no_progress, config_overrides(args)) == ("c.yaml", True, {"epochs": 2})


@pytest.mark.parametrize("overrides, match", [
    (["--base-lrr", "1"], "unknown config key or option '--base-lrr'; did you mean '--base_lr'"),
    (["--scales", "1,,"], "argument --scales: expected a list of numbers"),
    (["--scales", "0.5,x"], "argument --scales: expected a number, got 'x'"),
    (["--bins", "[1, 2"], "argument --bins: expected a list of ints"),
    (["--no-layers"], "unknown config key or option '--no-layers'"),
    ({"base_lrr": 1}, "overrides: unknown config key 'base_lrr'; did you mean 'base_lr'"),
])
def test_bad_overrides_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(overrides)


def test_cli_exits_2_with_a_hint(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--no-progres"])
    assert e.value.code == 2 and "did you mean '--no-progress'" in capsys.readouterr().err
    assert ConfigArgumentParser(exit_on_error=False).exit_on_error is False


def test_yaml_values_are_read_like_the_command_line(tmp_path):
    """YAML's own types are checked; strings (YAML reads 1e-4 as one) are parsed as on the command line."""
    cfg = TrainConfig.from_dict({"weight_decay": "1e-4", "scales": 1.0, "bins": "1,2", "epochs": 2.0, "data_root": 5,
                                 "fused": "off", "max_iters": "none"})
    assert (cfg.weight_decay, cfg.scales, cfg.bins, cfg.epochs, cfg.data_root, cfg.fused, cfg.max_iters) == (
        1e-4, [1.0], [1, 2], 2, "5", False, None)
    for data, match in (({"layers": True}, "config key 'layers': expected an int"),
                        ({"epochs": 2.5}, "config key 'epochs'"), ({"flip": 1}, "config key 'flip': expected a bool"),
                        ({"classes": None}, "config key 'classes': must not be null"),
                        ({"scales": {"a": 1}}, "config key 'scales': expected a list")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict(data)
    path = tmp_path / "c.yaml"
    path.write_text("layers: 34\nepochs: 3\n")
    assert load_config(path, {"epochs": 5}).epochs == 5 and load_config(path, ["--epochs", "4"]).epochs == 4


def test_every_config_file_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).dataset in path.name, path


def test_checkpoint_config_drops_unknown_keys_and_applies_overrides():
    state = {"config": {**TrainConfig().to_dict(), "layers": 34, "retired_key": 1}}
    with pytest.warns(UserWarning, match="retired_key"):
        cfg = checkpoint_config(state, "ck.pth", overrides=["--flip"])
    assert (cfg.layers, cfg.flip) == (34, True)
    with pytest.raises(ConfigError, match="--config is required"):
        checkpoint_config({}, "ck.pth")


@pytest.mark.parametrize("overrides, expected", [
    ([], (True, True, True)),
    (["--no-fused"], (False, False, False)),
    (["--fused_backbone", "false"], (True, True, False)),
    (["--no-fused", "--concat_free_head", "true"], (False, True, False)),
    (["--fused_ppm=false", "--fused_backbone", "none"], (False, True, True)),
])
def test_the_three_fused_switches_reach_the_model(overrides, expected):
    """fused_ppm, concat_free_head and fused_backbone: none follows fused; each sets its own PSPNet switch."""
    from pspnet.modeling import build_model
    cfg = load_config(None, overrides)
    model = build_model(cfg)
    assert (model.fused_ppm, model.concat_free_head, model.fused_backbone) == expected
    assert model.ppm.fused == expected[0] and model.layer1[0].fused == expected[2]
