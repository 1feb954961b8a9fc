"""A run's config from its sources: a YAML file (or the defaults), or the config stored in a checkpoint, then
the command-line overrides.

Usage::

    cfg = load_config("configs/camvid.yaml", ["--base_lr", "0.02", "--no-fused", "--scales", "0.5,1.0"])
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import yaml

from .config import ConfigError, TrainConfig
from .config_cli import parse_overrides

__all__ = ["read_yaml", "load_config", "checkpoint_config"]

Overrides = Sequence[str] | Mapping[str, Any]
"""Command-line tokens (``["--base_lr", "0.02"]``) or already parsed ``{field: value}``
(:func:`pspnet.config_cli.config_overrides`)."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The key / value mapping of a YAML config file. Nested mappings (semseg's ``DATA:`` / ``TRAIN:`` /
    ``TEST:`` sections) are flattened one level, so semseg-style files load too; an empty file is ``{}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: invalid YAML, not a mapping, or a key given twice (named).
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"config file not found: {source}")
    with open(source, "r", encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(loaded).__name__}")
    data: dict[str, Any] = {}
    for key, value in loaded.items():
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            if k in data:
                raise ConfigError(f"{source}: config key '{k}' given twice")
            data[k] = v
    return data


def load_config(path: Optional[str | os.PathLike] = None, overrides: Overrides = ()) -> TrainConfig:
    """The YAML config file ``path`` (the defaults when None) with ``overrides`` applied.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: YAML syntax error, unknown key (named, with a "did you mean" hint), or bad value (named).
    """
    data = read_yaml(path) if path is not None else {}
    return TrainConfig.from_dict({**data, **parse_overrides(overrides)},
                                 os.fspath(path) if path is not None else "defaults")


def checkpoint_config(state: dict[str, Any], checkpoint: str | os.PathLike, path: Optional[str | os.PathLike] = None,
                      overrides: Overrides = ()) -> TrainConfig:
    """The config to run a checkpoint with: the YAML file ``path`` if given, else the config stored in the
    checkpoint (keys this version lacks are dropped with a warning), then ``overrides``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: no ``path`` and the checkpoint stores no config (semseg's do not), or a bad key/value.
    """
    if path is not None:
        return load_config(path, overrides)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"--config is required: {checkpoint} holds no stored config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    dropped = sorted(set(saved) - known)
    if dropped:
        warnings.warn(f"{checkpoint}: ignoring stored config keys unknown to this version: {dropped}", stacklevel=2)
    data = {k: v for k, v in saved.items() if k in known}
    return TrainConfig.from_dict({**data, **parse_overrides(overrides)}, f"{checkpoint} (stored config)")
