"""``python -m pspnet.predict IMAGE_OR_FOLDER... (--checkpoint PATH | --onnx MODEL.onnx) [--out-dir DIR]
[--config YAML] [--scales 0.5,0.75,1.0,1.25,1.5,1.75] [--flip] [--key value ...]``

Segments images with a trained checkpoint (ours, or semseg's with ``--config``), or with a model exported by
``pspnet.export`` run in ONNX Runtime (``--onnx``: no torch network; fp32; the config and colours stored in the
model at export unless ``--config`` is given), using semseg's test procedure (:mod:`pspnet.inference`: resize
to ``base_size`` x scale, sliding window, optional flip, averaged over ``scales``). For each input
``<stem>.<ext>`` it writes, into ``--out-dir`` (default ``predictions``):

- ``pred/<stem>.png``: the colour-coded prediction (the training dataset's colours, stored in our
  checkpoints; semseg's PASCAL colour map otherwise);
- ``overlay/<stem>.png``: the prediction blended 0.5 over the image;
- ``label/<stem>.png``: the class ids as an 8-bit grey image (for scoring or submission).

A folder argument stands for its ``.png/.jpg/.jpeg/.bmp/.tif/.tiff`` files (not recursive). Files are written
atomically; nothing outside these three sub-folders is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig
from .config_cli import ConfigArgumentParser, config_overrides
from .config_files import checkpoint_config
from .data.datasets import read_rgb
from .inference import predict
from .modeling import load_for_inference
from .onnx_runtime import OnnxSegmenter, open_session, read_metadata
from .precision import autocast, resolve_amp
from .runtime import configure_process
from .visualize import colorize, overlay, write_rgb_png

__all__ = ["build_parser", "collect_images", "class_palette", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def build_parser() -> ConfigArgumentParser:
    """Parser for the prediction options and every config key (``--scales``, ``--flip``, ``--device``, ...)."""
    parser = ConfigArgumentParser(prog="python -m pspnet.predict", description=__doc__,
                                  usage=("%(prog)s IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...] "
                                         "(--checkpoint PATH | --onnx MODEL) [--config YAML] [--out-dir DIR] "
                                         "[--no-progress] [--key value ...]"),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (.pth)")
    source.add_argument("--onnx", metavar="MODEL", help="ONNX model written by pspnet.export, run in ONNX Runtime")
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="config file (default: the config stored in the checkpoint or ONNX model)")
    parser.add_argument("--out-dir", metavar="DIR", default="predictions", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return parser


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """The image files named by ``inputs`` (files as given; folders: their image files, sorted).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a folder holds no image, or two inputs share a file stem (their outputs would collide).
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{item} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem]} and {path} have the same stem '{path.stem}': their outputs "
                             f"would overwrite each other; predict them into different --out-dir folders")
        seen[path.stem] = path
    return files


def class_palette(state: dict, classes: int) -> np.ndarray:
    """uint8 [classes, 3] colours: the training dataset's (stored by ``pspnet.train``) when they fit,
    else semseg's PASCAL VOC colour map."""
    from pspnet.data.datasets import voc_palette
    stored = np.asarray(state.get("palette") or [], dtype=np.int64)
    if stored.shape == (classes, 3):
        return stored.astype(np.uint8)
    return voc_palette(classes)


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """(model, config, state holding the palette) of ``--checkpoint`` or ``--onnx`` (an
    :class:`~pspnet.onnx_runtime.OnnxSegmenter` on the CPU), the process configured by the config."""
    if args.onnx:
        session = open_session(args.onnx)
        stored = read_metadata(session)
        cfg = checkpoint_config(stored, args.onnx, args.config, config_overrides(args))
        configure_process(cfg)
        if cfg.threads is not None:
            session = open_session(args.onnx, cfg.threads)
        return OnnxSegmenter(session), cfg, stored
    state = load_checkpoint(args.checkpoint)
    cfg = checkpoint_config(state, args.checkpoint, args.config, config_overrides(args))
    configure_process(cfg)
    return load_for_inference(cfg, state), cfg, state


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, predict every image, return the exit code (0 = success; 2 = bad arguments or an
    unreadable input, naming it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        images = collect_images(args.inputs)
        model, cfg, state = _load(args)
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        parser.error(str(e))
    palette = class_palette(state, cfg.classes)
    if args.onnx:
        amp, reason = "none", "ONNX Runtime runs the exported fp32 graph"
    else:
        amp, reason = resolve_amp(cfg.amp, next(model.parameters()).device)
    device = torch.device("cpu") if args.onnx else next(model.parameters()).device
    print(f"precision: {amp} ({reason})")
    from pspnet.data import IMAGENET_MEAN, IMAGENET_STD
    out = Path(args.out_dir)
    for path in tqdm(images, desc="predict", unit="img", disable=args.no_progress, dynamic_ncols=True):
        try:
            image = read_rgb(path)
        except RuntimeError as e:
            parser.error(str(e))
        with autocast(device, amp):
            pred = predict(model, image, cfg.classes, cfg.base_size, (cfg.test_h, cfg.test_w), cfg.scales, cfg.flip,
                           IMAGENET_MEAN, IMAGENET_STD, cfg.window_batch)
        color = colorize(pred, palette)
        write_rgb_png(out / "pred" / f"{path.stem}.png", color)
        write_rgb_png(out / "overlay" / f"{path.stem}.png", overlay(image, color, 0.5))
        write_rgb_png(out / "label" / f"{path.stem}.png", pred.astype(np.uint8))
    print(f"wrote {len(images)} predictions to {out / 'pred'}, {out / 'overlay'} and {out / 'label'} "
          f"(scales {cfg.scales}, flip {cfg.flip}, precision {amp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
