"""The recipe of a PSPNet training / evaluation run: one dataclass, :class:`TrainConfig`, and its validation.

Field names follow hszhao/semseg's ``config/*/*.yaml`` where semseg has the setting (``train_h``,
``base_lr``, ``power``, ``aux_weight``, ``scales``, ...). Every knob of the recipe is a field, so a run is
fully described by its YAML file plus ``--key value`` overrides, and the resolved config is stored in
every checkpoint. Each field's ``dataclasses.field(metadata=...)`` holds its help text (``"help"``) and
whether it may change when a run is resumed (``"resume_free"``); the command line
(:mod:`pspnet.config_cli`) is generated from them, and YAML files and checkpoints are read by
:mod:`pspnet.config_files`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .data.registry import dataset_names
from .loss import LOSSES
from .precision import AMP_CHOICES

__all__ = ["TrainConfig", "ConfigError", "field_name", "field_help", "field_type", "parse_value", "resume_free_keys"]

VALID_LAYERS = (18, 34, 50, 101, 152)
VALID_ZOOM = (1, 2, 4, 8)


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the offending key."""


def _key(default: Any, help: str, *, resume_free: bool = False) -> Any:
    """A config field: its default (a list default is copied per instance), help text and whether it may
    change when a run is resumed (schedule length, bookkeeping, evaluation, file locations)."""
    metadata = {"help": help, "resume_free": resume_free}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a PSPNet training / evaluation run (semseg ``config/*.yaml`` names)."""

    # ---------------------------------------------------------------- data
    data_root: str = _key("../shared/data/camvid", "Dataset root folder (relative paths are relative to the "
                          "current working directory).", resume_free=True)
    dataset: str = _key("camvid", "Dataset layout, a name of the dataset registry (pspnet.data.registry): camvid, "
                        "ade20k (the ADEChallengeData2016 folder), voc2012 (semseg's voc2012 folder with SBD and "
                        "list/), cityscapes or folder (<split>/images, <split>/labels).")
    classes: int = _key(11, "Number of classes K (network output channels).")
    ignore_label: int = _key(255, "Label value excluded from the loss (the cross-entropy's ignore index) and the "
                             "metrics (semseg ignore_label); must be 255.")
    max_samples: Optional[int] = _key(None, "Use only the first N training images (in sorted file order); none = "
                                      "all. For smoke tests.")
    max_val_samples: Optional[int] = _key(None, "Use only the first N validation images; none = all. For smoke "
                                          "tests.", resume_free=True)
    cache_data: bool = _key(True, "Keep decoded images and labels in memory after the first read (saves PNG "
                            "decoding, costs RAM).", resume_free=True)

    # ---------------------------------------------------------------- model
    layers: int = _key(18, "ResNet depth of the backbone, one of 18, 34, 50, 101, 152.")
    bins: list[int] = _key([1, 2, 3, 6], "Pyramid pooling bin sizes (output cells per side), concatenated in "
                           "this order after x.")
    zoom_factor: int = _key(8, "Logit upsampling factor of semseg's PSPNet, one of 1, 2, 4, 8 (8 = full input "
                            "resolution).")
    dropout: float = _key(0.1, "Dropout2d probability in the cls and aux heads.")
    aux_weight: float = _key(0.4, "Weight of the auxiliary (layer3) loss: loss = main_loss + aux_weight * "
                             "aux_loss.")
    loss: str = _key("ce", "Pixel loss: ce (semseg's cross-entropy) or ce_median_freq (cross-entropy with "
                     "SegNet's median-frequency class weights, computed from the training labels and stored "
                     "in the checkpoint).")
    class_weight_power: float = _key(1.0, "Exponent of the median-frequency class weights of loss ce_median_freq: "
                                     "1 = SegNet's balancing, 0.5 = its square root (softer), 0 = none.")
    ohem_thresh: Optional[float] = _key(None, "Online hard example mining (mmsegmentation's OHEMPixelSampler): the "
                                        "loss counts only pixels whose true-class probability is below this "
                                        "(mmseg: 0.7), at least ohem_min_kept of them; null = every pixel.")
    ohem_min_kept: int = _key(100000, "The least number of pixels OHEM keeps per batch (mmseg's min_kept).")
    deep_stem: bool = _key(True, "semseg's 3x3 deep stem (true) or torchvision's 7x7 stem (false, for torchvision "
                           "ImageNet weights).")
    backbone_weights: Optional[str] = _key(None, "ImageNet ResNet weights for the backbone of a fresh run "
                                           "(semseg's resnet50_v2.pth format with deep_stem, torchvision's "
                                           "without); none = random init. Ignored on resume.", resume_free=True)
    fused: bool = _key(True, "Use the fused ops: pyramid pooling, the concat-free head, and the backbone's conv + "
                       "BN + ReLU (folded in eval; fused training ops on GPU). false = semseg's module-by-module "
                       "PyTorch model. The default of the three switches below.")
    fused_ppm: Optional[bool] = _key(None, "The pyramid pooling module runs the fused kernels; none = as fused.")
    concat_free_head: Optional[bool] = _key(None, "The head's 3x3 conv + BN + ReLU without the 2C-channel concat; "
                                            "none = as fused.")
    fused_backbone: Optional[bool] = _key(None, "The backbone's conv + BN (+ shortcut) + ReLU as one op each; none "
                                          "= as fused.")
    channels_last: bool = _key(True, "Run the model and its inputs in channels_last (NHWC) memory format: "
                               "oneDNN's fast layout on CPU (about 9 % faster per training step on a 2-core CPU "
                               "at batch 8, 180x240).")

    # ---------------------------------------------------------------- augmentation
    train_h: int = _key(180, "Training crop height in pixels.")
    train_w: int = _key(240, "Training crop width in pixels.")
    scale_min: float = _key(0.25, "Lower bound of the random rescale factor (relative to the stored image size).")
    scale_max: float = _key(1.0, "Upper bound of the random rescale factor (relative to the stored image size).")
    rotate_min: float = _key(-10.0, "Lower bound of the random rotation, degrees (applied with p=0.5, semseg "
                             "RandRotate).")
    rotate_max: float = _key(10.0, "Upper bound of the random rotation, degrees.")

    # ---------------------------------------------------------------- optimisation
    batch_size: int = _key(8, "Training images per iteration over all processes (semseg's global batch_size; "
                           "under torchrun each of the K processes takes batch_size / K). >= 2: BatchNorm on the "
                           "1x1 bin needs more than one value.")
    batch_size_val: int = _key(1, "Images per batch during validation (inference runs one image at a time; kept "
                               "for semseg parity).", resume_free=True)
    epochs: int = _key(14, "Number of passes over the training set (drop_last=True).", resume_free=True)
    max_iters: Optional[int] = _key(None, "Cap on the total number of iterations: max_iter = min(epochs * "
                                    "iters_per_epoch, max_iters), which is also the poly LR's max_iter. none = no "
                                    "cap.", resume_free=True)
    base_lr: float = _key(0.01, "Learning rate of the backbone (layer0..layer4) at iteration 0.")
    head_lr_mult: float = _key(10.0, "LR multiplier of the head (ppm, cls, aux) relative to base_lr (semseg: 10).")
    power: float = _key(0.9, "Exponent of the poly LR: lr = base_lr * (1 - iter / max_iter) ** power.")
    momentum: float = _key(0.9, "SGD momentum.")
    weight_decay: float = _key(1e-4, "SGD weight decay (L2), applied to every parameter including BN and biases "
                               "(semseg).")

    # ---------------------------------------------------------------- runtime
    workers: int = _key(0, "DataLoader worker processes (0 = load in the main process; workers compete for CPU "
                        "cores).", resume_free=True)
    seed: Optional[int] = _key(0, "Random seed for python, numpy, torch and the data order; none = draw one "
                               "(recorded in the checkpoint).")
    threads: Optional[int] = _key(None, "torch.set_num_threads value; none = PyTorch's default.", resume_free=True)
    keep_freed_memory: bool = _key(True, "glibc malloc keeps freed memory for reuse (no mmap per large block), "
                                   "so large activations do not page-fault in again every iteration "
                                   "(pspnet.runtime.keep_freed_memory); no effect without glibc.",
                                   resume_free=True)
    device: str = _key("auto", "auto (CUDA when available, else CPU), cpu or cuda; under torchrun each process "
                       "uses cuda:LOCAL_RANK.", resume_free=True)
    amp: str = _key("auto", "Mixed precision: auto (bf16 autocast where the device runs bf16 fast: CUDA sm_80+, "
                    "CPUs with AMX or AVX512-BF16; fp32 elsewhere), none (fp32), bf16 or fp16 autocast (fp16 with "
                    "a GradScaler); parameters, optimizer state and BatchNorm statistics stay fp32. Training, "
                    "validation, evaluate and predict all use it.")
    sync_bn: bool = _key(True, "Under torchrun on CUDA, convert every BatchNorm to SyncBatchNorm (batch statistics "
                         "over the global batch, as semseg); CPU runs keep per-process BatchNorm.")
    save_path: str = _key("runs/camvid", "Output folder for checkpoints, log.jsonl and validation results.",
                          resume_free=True)
    save_freq: int = _key(1, "Save a checkpoint every N epochs (a final.pth is always written at the end).",
                          resume_free=True)
    keep_last: int = _key(3, "Keep only the newest K epoch_*.pth checkpoints of this run; 0 = keep all. final.pth "
                          "is never pruned.", resume_free=True)
    eval_freq: int = _key(0, "Validate every N epochs; 0 = only once, after training.", resume_free=True)
    log_freq: int = _key(10, "Write a training row to log.jsonl every N iterations.", resume_free=True)
    resume: Optional[str] = _key(None, "none = fresh run; a checkpoint path; or auto = newest valid checkpoint in "
                                 "save_path.", resume_free=True)
    overwrite: bool = _key(False, "Allow a fresh (non-resumed) run in a save_path that already holds checkpoints.",
                           resume_free=True)

    # ---------------------------------------------------------------- testing (semseg tool/test.py)
    base_size: int = _key(240, "Long side, in pixels, the image is resized to at scale 1.0 before sliding-window "
                          "inference.", resume_free=True)
    test_h: int = _key(180, "Sliding-window crop height in pixels.", resume_free=True)
    test_w: int = _key(240, "Sliding-window crop width in pixels.", resume_free=True)
    scales: list[float] = _key([1.0], "Test scales (multiples of base_size); probabilities are averaged over them.",
                               resume_free=True)
    flip: bool = _key(False, "Also run each window horizontally flipped and average the probabilities.",
                      resume_free=True)
    window_batch: int = _key(16, "Max sliding windows (flips included) per forward pass during inference.",
                             resume_free=True)

    def validate(self) -> "TrainConfig":
        """Check the type and value range of every field (a string for a non-string field is parsed, as
        :func:`parse_value`: YAML reads ``1e-4`` as a string).

        Returns:
            self, for chaining.
        Raises:
            ConfigError: naming the first offending field.
        """
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, parse_value(field_type(f.name), getattr(self, f.name)))
            except ValueError as e:
                raise ConfigError(f"config key '{f.name}': {e}") from None

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"config key '{key}': {what}, got {getattr(self, key)!r}")

        need(self.dataset in dataset_names(), "dataset", f"one of {', '.join(dataset_names())}")
        need(self.classes >= 1, "classes", "must be >= 1")
        need(self.ignore_label == 255, "ignore_label",
             "only 255 is supported (CamVid's void value and PSPNet's cross-entropy ignore index)")
        need(self.classes < 255, "classes", "must be < 255 (255 is the ignore label)")
        for key in ("max_samples", "max_val_samples", "max_iters", "threads"):
            need(getattr(self, key) is None or getattr(self, key) >= 1, key, "must be none or >= 1")
        need(self.layers in VALID_LAYERS, "layers", f"must be one of {VALID_LAYERS}")
        need(len(self.bins) > 0 and all(b >= 1 for b in self.bins), "bins", "must be a non-empty list of ints >= 1")
        need(len(set(self.bins)) == len(self.bins), "bins", "must not repeat a size")
        need(self.zoom_factor in VALID_ZOOM, "zoom_factor", f"must be one of {VALID_ZOOM}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(0 <= self.aux_weight < math.inf, "aux_weight", "must be finite and >= 0")
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
        need(self.amp in AMP_CHOICES, "amp", f"must be one of {', '.join(AMP_CHOICES)}")
        need(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}")
        need(0 <= self.class_weight_power < math.inf, "class_weight_power", "must be a finite float >= 0")
        need(self.ohem_thresh is None or 0 < self.ohem_thresh <= 1, "ohem_thresh", "must be in (0, 1] or null")
        need(self.ohem_min_kept >= 1, "ohem_min_kept", "must be >= 1")
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
        """Build a validated config from a mapping of field names to values (missing keys: the defaults).

        Args:
            data: the values, typed (YAML, a checkpoint) or as command-line text.
            source: where ``data`` comes from, for the messages (a file name, ``command line``).
        Raises:
            ConfigError: ``data`` is not a mapping, has an unknown key (with a "did you mean" hint), or a
                bad value (naming the key).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        return cls(**{field_name(str(key), source): value for key, value in data.items()}).validate()


# ---------------------------------------------------------------------------- fields

@functools.lru_cache(maxsize=1)
def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_name(key: str, source: str) -> str:
    """The field a user-supplied ``key`` names (dashes may stand for underscores: ``max-iters``).

    Raises:
        ConfigError: ``key`` is not a field; the message names ``source`` and ``key`` and suggests the
            closest field.
    """
    name = key.strip().replace("-", "_")
    if name in _fields():
        return name
    close = difflib.get_close_matches(name, list(_fields()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


@functools.lru_cache(maxsize=None)
def field_type(name: str) -> Any:
    """The annotated type of field ``name`` (``int``, ``Optional[str]``, ``list[float]``, ...)."""
    return typing.get_type_hints(TrainConfig)[name]


def field_help(name: str) -> str:
    """The help text of field ``name`` (its ``metadata["help"]``)."""
    return _fields()[name].metadata["help"]


def resume_free_keys() -> frozenset[str]:
    """The fields that may change when a run is resumed without a warning (``metadata["resume_free"]``)."""
    return frozenset(name for name, f in _fields().items() if f.metadata["resume_free"])


# ---------------------------------------------------------------------------- values

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def parse_value(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (a field's annotation): command-line text is parsed, typed values (YAML,
    checkpoints) are checked.

    Text: numbers as Python's ``int`` / ``float``; bools ``true/false``, ``yes/no``, ``on/off``, ``1/0``;
    lists ``0.5,0.75,1`` or YAML's ``[0.5, 0.75, 1]`` (parsed by YAML); ``none`` / ``null`` for an optional
    field. Typed values: ints are accepted for floats and integral floats for ints, never bools for
    numbers; a number for a list field is a one-element list.

    Raises:
        ValueError: the value does not fit ``tp``; the message says what was expected.
    """
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return parse_value(inner, value)
    if value is None:
        raise ValueError(f"must not be null (expected {_type_name(tp)})")
    if typing.get_origin(tp) is list:
        return [parse_value(typing.get_args(tp)[0], item) for item in _as_list(value, tp)]
    if isinstance(value, str) and tp is not str:
        return _parse_text(tp, value.strip())
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and (isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))):
        return str(value)
    raise ValueError(f"expected {_type_name(tp)}, got {value!r}")


def _parse_text(tp: Any, text: str) -> Any:
    """Command-line text as a bool, int or float."""
    if tp is bool and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            pass
    raise ValueError(f"expected {_type_name(tp)}, got {text!r}")


def _as_list(value: Any, tp: Any) -> list:
    """The items of a list value: a list, a number, or text (``1,2`` or ``[1, 2]``, parsed by YAML)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        except yaml.YAMLError:
            raise ValueError(f"expected {_type_name(tp)} (1,2 or [1, 2]), got {text!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
    return list(value)


def _type_name(tp: Any) -> str:
    """``an int``, ``a list of numbers``, ... for the messages."""
    if typing.get_origin(tp) is list:
        return "a list of " + {int: "ints", float: "numbers"}[typing.get_args(tp)[0]]
    return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}[tp]
