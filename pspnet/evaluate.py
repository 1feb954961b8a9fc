"""``python -m pspnet.evaluate --checkpoint PATH [--config YAML] [--split val] [--scales 0.5,0.75,1.0,1.25,1.5,1.75]
[--flip] [--save-dir DIR] [--no-images] [--key value ...]``

Evaluates a checkpoint (ours, or semseg's ``{'state_dict': {'module.…'}}``) on a split of the config's
``dataset`` (CamVid, ADE20K, VOC 2012, Cityscapes or an image/label folder) with
semseg's test procedure (``tool/test.py``: resize to base_size x scale, sliding window, optional flip,
averaged over scales; see :mod:`pspnet.inference`) and semseg's metrics (:mod:`pspnet.metrics`).
Prints mIoU/mAcc/allAcc and the per-class table; writes ``metrics.json`` and ``metrics.md`` to the
save dir, colour-coded predictions to ``save-dir/pred/<name>.png`` and 0.5 overlays on the image to
``save-dir/overlay/<name>.png``. Existing files other than these outputs are never touched.
Without ``--config`` the config stored in the checkpoint is used; overrides apply on top.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


from .checkpoint import load_checkpoint
from .config import ConfigError
from .config_cli import ConfigArgumentParser, config_overrides
from .config_files import checkpoint_config
from .eval_loop import evaluate_dataset
from .loaders import base_dataset, build_eval_set
from .modeling import load_for_inference
from .precision import resolve_amp
from .report import write_report
from .runtime import configure_process
from .visualize import colorize, overlay, write_rgb_png

__all__ = ["build_parser", "main"]


def build_parser() -> ConfigArgumentParser:
    """Parser for the evaluation options and every config key (``--scales``, ``--flip``, ...)."""
    parser = ConfigArgumentParser(prog="python -m pspnet.evaluate", description=__doc__,
                                  usage=("%(prog)s --checkpoint PATH [--config YAML] [--split {train,val,test}] "
                                         "[--save-dir DIR] [--no-images] [--no-progress] [--key value ...]"),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.pth)")
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="config file (default: the config stored in the checkpoint)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="dataset split")
    parser.add_argument("--save-dir", metavar="DIR", default=None,
                        help="output folder (default: <checkpoint folder>/eval_<split>)")
    parser.add_argument("--no-images", action="store_true", help="do not write prediction / overlay PNGs")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return parser


def image_writer(save_dir: Path, palette):
    """``on_image(name, image, label, pred)`` for :func:`evaluate_dataset`: writes the colourised prediction
    to ``save_dir/pred/<name>.png`` and its 50 % overlay on the image to ``save_dir/overlay/<name>.png``."""
    def on_image(name, image, label, pred):
        color = colorize(pred, palette)
        write_rgb_png(save_dir / "pred" / f"{name}.png", color)
        write_rgb_png(save_dir / "overlay" / f"{name}.png", overlay(image, color, 0.5))
    return on_image


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, evaluate, return the exit code (0 = success; 2 = bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        parser.error(f"--checkpoint: {e}")
    try:
        cfg = checkpoint_config(state, args.checkpoint, args.config, config_overrides(args))
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    configure_process(cfg)
    try:
        dataset = build_eval_set(cfg, args.split, cfg.max_val_samples)
    except (FileNotFoundError, ConfigError) as e:
        parser.error(f"--split {args.split}: {e}")
    try:
        model = load_for_inference(cfg, state)
    except ValueError as e:
        parser.error(str(e))
    amp, reason = resolve_amp(cfg.amp, next(model.parameters()).device)
    print(f"precision: {amp} ({reason})")
    base, _ = base_dataset(dataset)
    save_dir = Path(args.save_dir) if args.save_dir else Path(args.checkpoint).parent / f"eval_{args.split}"
    save_dir.mkdir(parents=True, exist_ok=True)

    on_image = None if args.no_images else image_writer(save_dir, base.palette)
    t0 = time.perf_counter()
    metrics = evaluate_dataset(model, dataset, cfg, scales=cfg.scales, flip=cfg.flip, on_image=on_image,
                               desc=f"eval {args.split}", progress=not args.no_progress, amp=amp)
    seconds = time.perf_counter() - t0
    result = metrics.compute()
    table = metrics.table(base.classes)
    info = {"checkpoint": str(args.checkpoint), "split": args.split, "images": result["num_images"],
            "scales": list(cfg.scales), "flip": cfg.flip, "base_size": cfg.base_size,
            "crop": [cfg.test_h, cfg.test_w], "layers": cfg.layers, "fused": cfg.fused, "amp": amp,
            "seconds": round(seconds, 2), "classes": list(base.classes)}
    json_path, md_path = write_report(save_dir, "metrics", result, table, info)
    print(f"{args.split}: {metrics.summary()} ({result['num_images']} images, {seconds:.1f}s)")
    print(table)
    images = "" if args.no_images else f", {save_dir / 'pred'}, {save_dir / 'overlay'}"
    print(f"wrote {json_path}, {md_path}{images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
