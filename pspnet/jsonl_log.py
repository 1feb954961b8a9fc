"""The training log: one JSON object per line (``log.jsonl``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["JsonlLog"]


class JsonlLog:
    """Append-only JSON-lines log (one object per line, flushed after each write).

    Args:
        path: log file; its folder is created; an existing file is appended to, never truncated.
    """

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (must be JSON-serialisable; NaN/inf written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
