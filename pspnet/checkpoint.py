"""Crash-safe checkpoint files.

Writes go to a temporary file in the destination folder, are flushed and fsync'ed, then moved over the
destination with ``os.replace`` (atomic on POSIX), so a crash or error mid-save leaves any previous
file at that path intact and no temporary behind. Our checkpoints are dicts with at least
``state_dict`` (model), ``optimizer``, ``epoch`` (completed epochs), ``iteration`` (completed
iterations), ``config`` (TrainConfig as dict), ``lr_scheduler`` (the LR scheduler's ``state_dict``; absent
from checkpoints of earlier versions, which resume at the poly LR of their iteration), ``rng`` and ``best``
(metrics); ``state_dict`` is the key semseg's ``tool/train.py`` uses, so ``pspnet.models.load_state_dict``
reads both formats.

Run folders hold ``epoch_NNNN.pth`` (pruned to the newest ``keep_last``) and ``final.pth``.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "prune", "epoch_checkpoint_name", "FINAL_NAME"]

PathLike = Union[str, os.PathLike]
FINAL_NAME = "final.pth"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # mode of a file created by open() (mkstemp would give 0600)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a checkpoint); names the file."""


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after ``epoch`` completed epochs: ``epoch_0007.pth``."""
    return f"epoch_{epoch:04d}.pth"


def _fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb",
                 check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a file atomically: ``write(fileobj)`` fills a temporary file in the same folder, which is
    flushed, fsync'ed, given to ``check`` and renamed over ``path``.

    Args:
        path: destination; its parent folder is created if missing.
        write: callable receiving the open temporary file object.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).
        check: optional callable receiving the complete temporary file's path before the rename; it raises
            to refuse the file (``pspnet.export`` runs the exported model there).
    Returns:
        ``path`` as a Path.
    Raises:
        Whatever ``write`` or ``check`` raises (also KeyboardInterrupt); the temporary file is removed first
        and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    directory = str(path.parent) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path`` (see :func:`atomic_write`).

    Returns:
        ``path`` as a Path.
    Raises:
        Any error of ``torch.save`` (e.g. an unpicklable object, disk full); a previous file at
        ``path`` is then intact and no temporary file is left.
    """
    return atomic_write(path, lambda f: torch.save(dict(state), f))


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (``map_location="cpu"``, ``weights_only=True``).

    Accepts our checkpoints, semseg's (``{'epoch', 'state_dict', 'optimizer'}``) and a bare state_dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt, or does not hold a dict (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors differ between torch versions
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt file?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _run_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``epoch_*.pth`` files in ``directory``, oldest first."""
    found = []
    for p in directory.iterdir():
        m = _EPOCH_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(directory: PathLike) -> list[Path]:
    """Our checkpoint files in ``directory``, newest first: ``final.pth`` then ``epoch_*.pth`` by
    descending epoch. Missing folder -> []."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    paths = [p for _, p in reversed(_run_checkpoints(directory))]
    final = directory / FINAL_NAME
    if final.is_file():
        paths.insert(0, final)
    return paths


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """Newest readable checkpoint in ``directory`` (for ``--resume auto``).

    Candidates are ordered by their stored ``iteration`` (ties: ``final.pth``, then higher epoch
    number); unreadable ones are skipped with a ``UserWarning`` naming them.

    Returns:
        the path, or None when the folder has no readable checkpoint (or does not exist).
    """
    best: Optional[tuple[int, int, Path]] = None
    for rank, path in enumerate(reversed(list_checkpoints(directory))):
        try:
            state = load_checkpoint(path)
        except (CheckpointError, OSError) as e:
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
            continue
        key = (int(state.get("iteration", -1)), rank, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def prune(directory: PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``epoch_*.pth`` files in ``directory``.

    Only files named ``epoch_<digits>.pth`` are considered; ``final.pth`` and anything else are never
    touched. ``keep_last <= 0`` keeps everything.

    Returns:
        the deleted paths.
    """
    if keep_last <= 0:
        return []
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ckpts = _run_checkpoints(directory)
    removed = []
    for _, p in ckpts[:max(len(ckpts) - keep_last, 0)]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
