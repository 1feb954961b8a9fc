"""pspnet.checkpoint: atomic save, corrupt-file detection, --resume auto selection, pruning."""

import os
import stat

import pytest
import torch

import pspnet.checkpoint as ckpt
from pspnet.checkpoint import (CheckpointError, atomic_write, latest_checkpoint, load_checkpoint, prune,
                               save_checkpoint)


def _state(value: float, iteration: int = 0):
    return {"state_dict": {"w": torch.full((4,), value)}, "iteration": iteration, "epoch": 0,
            "config": {"layers": 18}, "best": {}}


def _no_tmp(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")] == []


def test_roundtrip_and_permissions(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "a.pth", _state(1.5, 7))
    state = load_checkpoint(path)
    assert torch.equal(state["state_dict"]["w"], torch.full((4,), 1.5))
    assert state["iteration"] == 7
    assert _no_tmp(path.parent)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # like open(), not mkstemp's 0600


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_save_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "final.pth"
    save_checkpoint(path, _state(1.0))
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial bytes of a zip")  # half-written data reaches the temp file
        raise exc

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.full((4,), 1.0))
    assert _no_tmp(tmp_path)


def test_failure_on_fresh_path_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x.json", lambda f: 1 / 0, mode="w")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_raises_naming_it(tmp_path, damage):
    path = save_checkpoint(tmp_path / "epoch_0001.pth", _state(3.0))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="epoch_0001.pth"):
        load_checkpoint(path)


def test_missing_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_latest_checkpoint_skips_corrupt(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path / "epoch_0001.pth", _state(1.0, iteration=10))
    save_checkpoint(tmp_path / "epoch_0002.pth", _state(2.0, iteration=20))
    newest = save_checkpoint(tmp_path / "epoch_0003.pth", _state(3.0, iteration=30))
    (tmp_path / "notes.pth").write_bytes(b"ignored: not our naming scheme")
    assert latest_checkpoint(tmp_path) == newest
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash outside our writer
    with pytest.warns(UserWarning, match="epoch_0003.pth"):
        assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0002.pth"
    final = save_checkpoint(tmp_path / "final.pth", _state(4.0, iteration=25))
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) == final


def test_prune_keeps_newest_and_never_touches_others(tmp_path):
    for e in (1, 2, 3, 10):
        save_checkpoint(tmp_path / f"epoch_{e:04d}.pth", _state(float(e), e))
    save_checkpoint(tmp_path / "final.pth", _state(0.0))
    (tmp_path / "epoch_best.pth").write_bytes(b"user file")
    (tmp_path / "log.jsonl").write_text("{}\n")
    removed = prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["epoch_0001.pth", "epoch_0002.pth"]
    assert sorted(os.listdir(tmp_path)) == ["epoch_0003.pth", "epoch_0010.pth", "epoch_best.pth", "final.pth",
                                            "log.jsonl"]
    assert prune(tmp_path, keep_last=0) == []
    assert prune(tmp_path / "missing", keep_last=1) == []


