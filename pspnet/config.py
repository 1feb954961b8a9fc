"""Training / evaluation configuration: one dataclass, loaded from YAML, overridden from the command line.

Field names follow hszhao/semseg's ``config/*/*.yaml`` where semseg has the setting (``train_h``,
``base_lr``, ``power``, ``aux_weight``, ``scales``, ...). Every knob of the recipe is a field here, so
a run is fully described by its YAML file plus ``--key value`` overrides, and the resolved config is
stored in every checkpoint.

Usage::

    cfg = load_config("configs/camvid.yaml", ["--base_lr", "0.02", "--no-fused", "--scales", "0.5,1.0"])

Overrides accept ``--key value``, ``--key=value``, ``--some-key`` spelled with dashes, a bare
``--flag`` (sets a bool field to true) and ``--no-flag`` (sets it to false). Values are parsed by the
field's type: bools from ``true/false`` (also ``yes/no``, ``on/off``, ``1/0``), lists from ``1,2,3`` or
YAML ``[1, 2, 3]``, optional fields from ``none``/``null``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from .data.registry import dataset_names

__all__ = ["TrainConfig", "ConfigError", "load_config", "checkpoint_config", "apply_overrides", "parse_value",
           "config_help"]

VALID_LAYERS = (18, 34, 50, 101, 152)
VALID_ZOOM = (1, 2, 4, 8)


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the offending key."""


@dataclass
class TrainConfig:
    """Every setting of a PSPNet training / evaluation run (semseg ``config/*.yaml`` names).

    Each field carries an attribute docstring (shown by :func:`config_help`) with its unit.
    """

    # ---------------------------------------------------------------- data
    data_root: str = "../shared/data/camvid"
    """Dataset root folder (relative paths are relative to the current working directory)."""
    dataset: str = "camvid"
    """Dataset layout: ``camvid``, ``ade20k`` (the ADEChallengeData2016 folder), ``voc2012`` (semseg's
    voc2012 folder with SBD and list/), ``cityscapes`` or ``folder`` (``<split>/images``, ``<split>/labels``);
    the names of :mod:`pspnet.data.registry`."""
    classes: int = 11
    """Number of classes K (network output channels)."""
    ignore_label: int = 255
    """Label value excluded from loss and metrics (semseg ``ignore_label``); must be 255."""
    max_samples: Optional[int] = None
    """Use only the first N training images (in sorted file order); None = all. For smoke tests."""
    max_val_samples: Optional[int] = None
    """Use only the first N validation images; None = all. For smoke tests."""
    cache_data: bool = True
    """Keep decoded images and labels in memory after the first read (saves PNG decoding, costs RAM)."""

    # ---------------------------------------------------------------- model
    layers: int = 18
    """ResNet depth of the backbone, one of 18, 34, 50, 101, 152."""
    bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    """Pyramid pooling bin sizes (output cells per side), concatenated in this order after x."""
    zoom_factor: int = 8
    """Logit upsampling factor of semseg's PSPNet, one of 1, 2, 4, 8 (8 = full input resolution)."""
    dropout: float = 0.1
    """Dropout2d probability in the cls and aux heads."""
    aux_weight: float = 0.4
    """Weight of the auxiliary (layer3) loss: loss = main_loss + aux_weight * aux_loss."""
    deep_stem: bool = True
    """semseg's 3x3 deep stem (True) or torchvision's 7x7 stem (False, for torchvision ImageNet weights)."""
    backbone_weights: Optional[str] = None
    """ImageNet ResNet weights for the backbone of a fresh run (semseg's ``resnet50_v2.pth`` format with
    ``deep_stem``, torchvision's without); None = random init. Ignored on resume."""
    fused: bool = True
    """Use the fused ops: pyramid pooling, the concat-free head, and the backbone's conv + BN + ReLU (folded in
    eval; fused training ops on GPU). False = semseg's module-by-module PyTorch model."""
    channels_last: bool = True
    """Run the model and its inputs in channels_last (NHWC) memory format: oneDNN's fast layout on CPU
    (about 9 % faster per training step on the 2-core CPU at batch 8, 180x240)."""

    # ---------------------------------------------------------------- augmentation
    train_h: int = 180
    """Training crop height in pixels."""
    train_w: int = 240
    """Training crop width in pixels."""
    scale_min: float = 0.25
    """Lower bound of the random rescale factor (relative to the stored image size)."""
    scale_max: float = 1.0
    """Upper bound of the random rescale factor (relative to the stored image size)."""
    rotate_min: float = -10.0
    """Lower bound of the random rotation, degrees (applied with p=0.5, semseg RandRotate)."""
    rotate_max: float = 10.0
    """Upper bound of the random rotation, degrees."""

    # ---------------------------------------------------------------- optimisation
    batch_size: int = 8
    """Training images per iteration over all processes (semseg's global ``batch_size``; under torchrun each
    of the K processes takes batch_size / K). >= 2: BatchNorm on the 1x1 bin needs more than one value."""
    batch_size_val: int = 1
    """Images per batch during validation (inference runs one image at a time; kept for semseg parity)."""
    epochs: int = 14
    """Number of passes over the training set (``drop_last=True``)."""
    max_iters: Optional[int] = None
    """Cap on the total number of iterations: max_iter = min(epochs * iters_per_epoch, max_iters), which is
    also the poly schedule's max_iter. None = no cap."""
    base_lr: float = 0.01
    """Learning rate of the backbone (layer0..layer4) at iteration 0."""
    head_lr_mult: float = 10.0
    """LR multiplier of the head (ppm, cls, aux) relative to base_lr (semseg: 10)."""
    power: float = 0.9
    """Exponent of the poly schedule lr = base_lr * (1 - iter / max_iter) ** power."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay (L2), applied to every parameter including BN and biases (semseg)."""

    # ---------------------------------------------------------------- runtime
    workers: int = 0
    """DataLoader worker processes (0 = load in the main process; workers compete for CPU cores)."""
    seed: Optional[int] = 0
    """Random seed for python, numpy, torch and the data order; None = draw one (recorded in the checkpoint)."""
    threads: Optional[int] = None
    """torch.set_num_threads value; None = PyTorch's default."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; under torchrun each process uses
    ``cuda:LOCAL_RANK``."""
    amp: str = "none"
    """Mixed precision: ``none`` (fp32), ``bf16`` or ``fp16`` autocast (fp16 with a GradScaler); parameters,
    optimizer state and BatchNorm statistics stay fp32."""
    sync_bn: bool = True
    """Under torchrun on CUDA, convert every BatchNorm to SyncBatchNorm (batch statistics over the global
    batch, as semseg); CPU runs keep per-process BatchNorm."""
    save_path: str = "runs/camvid"
    """Output folder for checkpoints, log.jsonl and validation results."""
    save_freq: int = 1
    """Save a checkpoint every N epochs (a ``final.pth`` is always written at the end)."""
    keep_last: int = 3
    """Keep only the newest K ``epoch_*.pth`` checkpoints of this run; 0 = keep all. final.pth is never pruned."""
    eval_freq: int = 0
    """Validate every N epochs; 0 = only once, after training."""
    log_freq: int = 10
    """Write a training row to log.jsonl every N iterations."""
    resume: Optional[str] = None
    """None = fresh run; a checkpoint path; or ``auto`` = newest valid checkpoint in save_path."""
    overwrite: bool = False
    """Allow a fresh (non-resumed) run in a save_path that already holds checkpoints."""

    # ---------------------------------------------------------------- testing (semseg tool/test.py)
    base_size: int = 240
    """Long side, in pixels, the image is resized to at scale 1.0 before sliding-window inference."""
    test_h: int = 180
    """Sliding-window crop height in pixels."""
    test_w: int = 240
    """Sliding-window crop width in pixels."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Test scales (multiples of base_size); probabilities are averaged over them."""
    flip: bool = False
    """Also run each window horizontally flipped and average the probabilities."""
    window_batch: int = 16
    """Max sliding windows (flips included) per forward pass during inference."""

    def validate(self) -> "TrainConfig":
        """Check types and value ranges of every field.

        Returns:
            self, for chaining.
        Raises:
            ConfigError: naming the first offending field.
        """
        hints = _type_hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"config key '{key}': {what}, got {getattr(self, key)!r}")

        need(self.dataset in dataset_names(), "dataset", f"one of {', '.join(dataset_names())}")
        need(self.classes >= 1, "classes", "must be >= 1")
        need(self.ignore_label == 255, "ignore_label",
             "only 255 is supported (CamVid's void value and PSPNet's CrossEntropyLoss ignore_index)")
        need(self.classes < 255, "classes", "must be < 255 (255 is the ignore label)")
        for key in ("max_samples", "max_val_samples", "max_iters", "threads"):
            need(getattr(self, key) is None or getattr(self, key) >= 1, key, "must be None or >= 1")
        need(self.layers in VALID_LAYERS, "layers", f"must be one of {VALID_LAYERS}")
        need(len(self.bins) > 0 and all(b >= 1 for b in self.bins), "bins", "must be a non-empty list of ints >= 1")
        need(len(set(self.bins)) == len(self.bins), "bins", "must not repeat a size")
        need(self.zoom_factor in VALID_ZOOM, "zoom_factor", f"must be one of {VALID_ZOOM}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.aux_weight >= 0, "aux_weight", "must be >= 0")
        for key in ("train_h", "train_w", "base_size", "test_h", "test_w", "epochs", "batch_size_val",
                    "save_freq", "log_freq", "window_batch"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(0 < self.scale_min <= self.scale_max, "scale_min", "must satisfy 0 < scale_min <= scale_max")
        need(self.rotate_min <= self.rotate_max, "rotate_min", "must be <= rotate_max")
        need(self.batch_size >= 2, "batch_size",
             "must be >= 2 (BatchNorm after the 1x1 pyramid bin needs more than one value per channel)")
        need(self.base_lr > 0, "base_lr", "must be > 0")
        need(self.head_lr_mult > 0, "head_lr_mult", "must be > 0")
        need(self.power >= 0, "power", "must be >= 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.workers >= 0, "workers", "must be >= 0")
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(self.amp in ("none", "bf16", "fp16"), "amp", "must be none, bf16 or fp16")
        need(self.keep_last >= 0, "keep_last", "must be >= 0 (0 = keep all)")
        need(self.eval_freq >= 0, "eval_freq", "must be >= 0 (0 = only at the end)")
        need(len(self.scales) > 0 and all(s > 0 for s in self.scales), "scales",
             "must be a non-empty list of positive floats")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-``dict`` copy (lists copied), safe to YAML/JSON-dump or store in a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build a validated config from a mapping.

        Raises:
            ConfigError: ``data`` is not a mapping, has an unknown key, or a bad value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        cfg = cls()
        for key, value in data.items():
            name = _field_name(str(key), source)
            setattr(cfg, name, value)
        return cfg.validate()


# ---------------------------------------------------------------------------- type handling

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


@functools.lru_cache(maxsize=1)
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _field_name(key: str, source: str) -> str:
    """Map a user-supplied key (dashes allowed) to a field name, or raise naming it."""
    name = key.strip().replace("-", "_")
    names = _field_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return name


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``.

    Strings are parsed (``"1e-4"`` -> float, ``"true"`` -> bool, ``"1,2"`` -> list); other values must
    already have the right type (ints are accepted for float fields, never bools for numbers).

    Raises:
        ConfigError: naming ``key`` when the value does not fit the type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if value is None:
        raise ConfigError(f"config key '{key}': must not be null (expected {_type_name(tp)})")
    if origin is list:
        (elem,) = args
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _yaml_scalar(key, text)
            else:
                value = [v for v in (p.strip() for p in text.split(",")) if v != ""]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(elem)}, got {value!r}")
        return [coerce(key, v, elem) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}': expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise TypeError(f"config key '{key}': unsupported field type {tp!r}")  # programming error


def _yaml_scalar(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': cannot parse {text!r} as YAML: {e}") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, text: str) -> Any:
    """Parse a command-line string for field ``key`` (dashes allowed) by the field's type.

    Raises:
        ConfigError: unknown key or unparsable value, naming the key.
    """
    name = _field_name(key, "command line")
    return coerce(name, text, _type_hints()[name])


# ---------------------------------------------------------------------------- loading

def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``--key value`` / ``--key=value`` / ``--flag`` / ``--no-flag`` overrides in order.

    Args:
        cfg: config to modify (in place).
        overrides: the command-line tokens, e.g. ``["--base_lr", "0.02", "--no-fused"]``.
    Returns:
        ``cfg``, validated.
    Raises:
        ConfigError: a token is not ``--key``, a key is unknown, a value is missing or does not parse.
    """
    hints = _type_hints()
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"command line: expected '--key value', got {tok!r}")
        body = tok[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            name = _field_name(key, "command line")
            i += 1
        else:
            key = body
            plain = key.replace("-", "_")
            if plain.startswith("no_") and hints.get(plain[3:]) is bool:  # --no-fused
                setattr(cfg, plain[3:], False)
                i += 1
                continue
            name = _field_name(key, "command line")
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if hints[name] is bool and (nxt is None or _looks_like_option(nxt)):
                setattr(cfg, name, True)
                i += 1
                continue
            if nxt is None:
                raise ConfigError(f"command line: option '--{key}' needs a value")
            text = nxt
            i += 2
        setattr(cfg, name, coerce(name, text, hints[name]))
    return cfg.validate()


def _looks_like_option(tok: str) -> bool:
    """True for ``--word`` tokens (negative numbers such as ``-10`` are values)."""
    return tok.startswith("--") and len(tok) > 2


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    The YAML file is a flat mapping of field names; nested mappings (semseg's ``TRAIN:``/``TEST:``
    sections) are flattened one level, so semseg-style files load too.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: YAML syntax error, unknown key (named), or bad value (named).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"config file not found: {source}")
        with open(source, "r", encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{source}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if isinstance(value, dict):  # semseg-style sections: DATA:, TRAIN:, TEST:
                for k, v in value.items():
                    if k in data:
                        raise ConfigError(f"{source}: config key '{k}' given twice")
                    data[k] = v
            else:
                if key in data:
                    raise ConfigError(f"{source}: config key '{key}' given twice")
                data[key] = value
    cfg = TrainConfig.from_dict(data, source)
    return apply_overrides(cfg, overrides)


def checkpoint_config(state: dict[str, Any], checkpoint: str | os.PathLike, path: Optional[str | os.PathLike] = None,
                      overrides: Sequence[str] = ()) -> TrainConfig:
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
    known = set(_field_names())
    dropped = sorted(set(saved) - known)
    if dropped:
        warnings.warn(f"{checkpoint}: ignoring stored config keys unknown to this version: {dropped}", stacklevel=2)
    cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known}, f"{checkpoint} (stored config)")
    return apply_overrides(cfg, overrides)


@functools.lru_cache(maxsize=1)
def _field_docs() -> dict[str, str]:
    """Attribute docstrings of TrainConfig, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(TrainConfig))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) \
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            docs[prev.target.id] = node.value.value
    return docs


def config_help() -> str:
    """Human-readable list of every config key with its type, default and docstring (for ``--help``)."""
    hints, docs, defaults = _type_hints(), _field_docs(), TrainConfig()
    lines = ["config keys (YAML or --key value):"]
    for name in _field_names():
        flag = f"--{name} / --no-{name}" if hints[name] is bool else f"--{name}"
        lines.append(f"  {flag} ({_type_name(hints[name])}, default {getattr(defaults, name)!r}): "
                     f"{' '.join(docs.get(name, '').split())}")
    return "\n".join(lines)
