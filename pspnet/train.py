"""``python -m pspnet.train --config configs/camvid.yaml [--key value ...] [--no-fused] [--amp bf16|fp16]
[--resume PATH|auto]``

Trains PSPNet with semseg's recipe (``tool/train.py``; see :mod:`pspnet.trainer`). Every config key
can be overridden as ``--key value`` (``python -m pspnet.train --help`` lists them). Writes
``save_path/log.jsonl``, ``epoch_NNNN.pth`` checkpoints (last ``keep_last`` kept), ``final.pth`` and
``final_metrics.{json,md}``; prints the final checkpoint's path.

Multi-GPU (one process per GPU; ``batch_size`` stays the global batch):
``torchrun --nproc_per_node=8 -m pspnet.train --config configs/ade20k_pspnet50.yaml``; multi-node adds
torchrun's ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint`` (or ``--master_addr/--master_port``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError
from .config_cli import ConfigArgumentParser, config_overrides
from .config_files import load_config
from .distributed import cleanup
from .trainer import Trainer

__all__ = ["build_parser", "main"]


def build_parser() -> ConfigArgumentParser:
    """Parser for ``--config``, ``--no-progress`` and every config key (``--key value``)."""
    parser = ConfigArgumentParser(prog="python -m pspnet.train", description=__doc__,
                                  usage="%(prog)s [--config YAML] [--no-progress] [--key value ...]",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="config file (default: the TrainConfig defaults)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit code (0 = success, 130 = Ctrl-C).

    Config errors (unknown key, bad value, occupied save_path) exit with status 2 and a message naming
    the offending key.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, config_overrides(args))
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        try:
            trainer = Trainer(cfg, progress=not args.no_progress)
        except (ConfigError, FileNotFoundError, CheckpointError, ValueError) as e:  # save_path, data, resume, device
            parser.error(str(e))
        try:
            trainer.run()
        except KeyboardInterrupt:
            print(f"\ninterrupted at iteration {trainer.iteration}; checkpoints in {trainer.save_dir} are intact, "
                  f"continue with --resume auto", file=sys.stderr)
            return 130
        return 0
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
