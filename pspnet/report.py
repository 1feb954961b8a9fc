"""The metrics report of an evaluation: ``<stem>.json`` and ``<stem>.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write

__all__ = ["write_report"]


def write_report(directory: os.PathLike | str, stem: str, metrics: dict[str, Any], table: str,
                 info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (metrics + info) and ``<stem>.md`` (info + per-class table) atomically.

    Returns:
        the two paths.
    """
    directory = Path(directory)
    payload = {**info, **metrics}
    json_path = atomic_write(directory / f"{stem}.json", lambda f: json.dump(payload, f, indent=2), mode="w")
    lines = [f"# {stem}", ""] + [f"- {k}: {v}" for k, v in info.items()] + [
        "", f"mIoU/mAcc/allAcc {metrics['miou']:.4f}/{metrics['macc']:.4f}/{metrics['allacc']:.4f}", "", table, ""]
    md_path = atomic_write(directory / f"{stem}.md", lambda f: f.write("\n".join(lines)), mode="w")
    return json_path, md_path
