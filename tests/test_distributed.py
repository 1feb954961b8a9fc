"""Multi-process training (DistributedDataParallel over gloo on CPU, as torchrun starts it), the sharded
sampler, the metric reduction, SyncBatchNorm in the fused modules, mixed precision, and a SIGKILL of a
training process followed by ``--resume auto``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from pspnet.checkpoint import load_checkpoint
from pspnet.config_files import load_config
from pspnet.sampler import EpochSampler
from pspnet.metrics import SegmentationMetrics
from pspnet.models import PSPNet

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = (REPO.parent / "shared" / "data" / "camvid").resolve()
CONFIG = REPO / "configs" / "camvid.yaml"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "classes.json").is_file(), reason="CamVid not available")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


def _tiny(save_path, *extra, threads=1):
    """8 CamVid images, global batch 4 (2 iterations/epoch), 65x65 crops, 3 validation images at base 64."""
    return ["--data_root", str(DATA_ROOT), "--save_path", str(save_path), "--max_samples", "8",
            "--max_val_samples", "3", "--batch_size", "4", "--train_h", "65", "--train_w", "65", "--base_size", "64",
            "--test_h", "48", "--test_w", "64", "--log_freq", "1", "--keep_last", "0", "--threads", str(threads),
            "--device", "cpu", *extra]


def _rows(save_path, kind):
    lines = (Path(save_path) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


# ---------------------------------------------------------------------------- sampler and reduction

def test_sharded_sampler_splits_every_global_batch():
    single = EpochSampler(10, seed=5, batch_size=4)
    shards = [EpochSampler(10, seed=5, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    for s in (single, *shards):
        s.set_epoch(3, skip=4)
    whole, parts = list(single), [list(s) for s in shards]
    assert len(whole) == 4 and whole == single.permutation(3)[4:8]  # one batch left, the tail of 2 dropped
    assert parts == [whole[0:2], whole[2:4]] and [len(s) for s in shards] == [2, 2]
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochSampler(10, seed=0, batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        single.set_epoch(0, skip=2)


def test_metrics_reduce_sums_every_area():
    rng = np.random.default_rng(0)
    preds, targets = rng.integers(0, 4, (6, 5, 7)), rng.integers(0, 4, (6, 5, 7))
    targets[0, 0] = 255
    whole, parts = SegmentationMetrics(4), [SegmentationMetrics(4), SegmentationMetrics(4)]
    for j in range(6):
        whole.update(preds[j], targets[j])
        parts[j % 2].update(preds[j], targets[j])
    other = torch.from_numpy(np.concatenate([parts[1].intersection, parts[1].union, parts[1].target, [parts[1].count]]))
    parts[0].reduce(lambda t: t + other)  # what all_reduce_sum does over two processes
    assert parts[0].compute() == whole.compute()


# ---------------------------------------------------------------------------- two processes (gloo)

def _worker(rank: int, world: int, port: int, argv: list, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pspnet.distributed import cleanup
    from pspnet.trainer import Trainer
    trainer = Trainer(load_config(str(CONFIG), argv), progress=False)
    try:
        trainer.run()
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        torch.save({"params": params, "state": trainer.model.state_dict(), "metrics": trainer.last_metrics},
                   Path(out) / f"rank{rank}.pt")
    finally:
        cleanup()


@needs_data
def test_two_process_ddp_keeps_ranks_identical_and_reduces_metrics(tmp_path, capfd):
    run = tmp_path / "run"
    mp.start_processes(_worker, args=(2, _free_port(), _tiny(run, "--max_iters", "3"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():  # DDP averages the gradients: every step is the same on both ranks
        assert torch.equal(v, r1["params"][k]), k
    assert r0["metrics"] == r1["metrics"]  # both hold the reduced metrics of all 3 images
    assert r0["metrics"]["num_images"] == 3

    # rank 0 alone logs and writes: one start row, iterations 1..3 once each, images = the global batch
    assert len(_rows(run, "start")) == 1 and _rows(run, "start")[0]["world_size"] == 2
    rows = _rows(run, "train")
    assert [r["iter"] for r in rows] == [1, 2, 3]
    state = load_checkpoint(run / "final.pth")
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert state["state_dict"].keys() == r0["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(state["state_dict"][k], v), k

    # the reduced metrics are those of one process evaluating the saved model on the same images
    proc = subprocess.run([sys.executable, "-m", "pspnet.evaluate", "--checkpoint", str(run / "final.pth"),
                           "--save-dir", str(tmp_path / "eval"), "--no-images", "--no-progress", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("area_intersection", "area_union", "area_target", "num_images", "miou", "macc", "allacc"):
        assert single[key] == r0["metrics"][key], key


@needs_data
def test_torchrun_command_trains_on_two_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pspnet.train",
           "--config", str(CONFIG), *_tiny(run, "--max_iters", "2"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final checkpoint:") == 1  # printed by rank 0 only
    assert "2 processes x cpu" in proc.stdout
    assert [r["iter"] for r in _rows(run, "train")] == [1, 2]
    assert load_checkpoint(run / "final.pth")["iteration"] == 2


@needs_data
def test_global_batch_must_split_into_shares_of_two(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pspnet.train",
           "--config", str(CONFIG), *_tiny(tmp_path / "run", "--batch_size", "2"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env(OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "config key 'batch_size': the global batch 2 must split into 2 equal shares" in proc.stderr


# ---------------------------------------------------------------------------- SyncBatchNorm, mixed precision

def test_fused_model_with_sync_batchnorm_matches_plain_batchnorm():
    """One process: SyncBatchNorm computes local statistics, so the module fallback of the fused PPM and
    head must give the fused ops' numbers (fp64)."""
    torch.manual_seed(0)
    plain = PSPNet(layers=18, classes=5, fused=True).double().train()
    synced = PSPNet(layers=18, classes=5, fused=True).double().train()
    synced.load_state_dict(plain.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(synced)
    assert isinstance(synced.ppm.features[0][2], nn.SyncBatchNorm) and isinstance(synced.cls[1], nn.SyncBatchNorm)
    x, y = torch.randn(2, 3, 65, 65, dtype=torch.float64), torch.randint(0, 5, (2, 65, 65))
    losses = []
    for model in (plain, synced):
        torch.manual_seed(1)
        _, main, aux = model(x, y)
        (main + 0.4 * aux).backward()
        losses.append(main.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    grads = dict(plain.named_parameters())
    for name, p in synced.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)
    for name, b in synced.state_dict().items():
        torch.testing.assert_close(b, plain.state_dict()[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_fused_model_trains_under_autocast_like_the_unfused_one(amp, device):
    """Under autocast the fused model's loss and head-conv gradient are as close to the fp32 ones as the
    unfused model's (normwise, within 2x), and its parameter gradients stay fp32."""
    torch.manual_seed(0)
    fused = PSPNet(layers=18, classes=5, fused=True).train().to(device)
    plain = PSPNet(layers=18, classes=5, fused=False).train().to(device)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(2, 3, 65, 65, device=device), torch.randint(0, 5, (2, 65, 65), device=device)

    def run(model, dtype):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            _, main, aux = model(x, y)
            loss = main + 0.4 * aux
        loss.backward()
        conv = model.cls[0]
        if model.concat_free_head:
            return loss.item(), torch.cat([conv.weight_x.grad, conv.weight_branches.grad], 1)
        return loss.item(), conv.weight.grad

    exact_loss, exact_grad = run(plain, None)
    (fused_loss, fused_grad), (plain_loss, plain_grad) = run(fused, amp), run(plain, amp)
    assert fused_grad.dtype == torch.float32
    assert abs(fused_loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-3 * abs(exact_loss)
    norm = torch.linalg.vector_norm
    err = lambda g: (norm(g - exact_grad) / norm(exact_grad)).item()  # noqa: E731
    assert err(fused_grad) <= 2 * err(plain_grad), (err(fused_grad), err(plain_grad))


@needs_data
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16"])
def test_train_command_with_amp(tmp_path, amp, device):
    """``--amp`` forces a mode; ``auto`` resolves per device, and the log and the checkpoint record what ran."""
    from pspnet.precision import resolve_amp
    from pspnet.train import main as train_main
    run = tmp_path / "run"
    assert train_main(["--config", str(CONFIG), *_tiny(run, "--max_iters", "2", "--amp", amp, "--batch_size", "2",
                                                       "--device", device), "--no-progress"]) == 0
    state = load_checkpoint(run / "final.pth")
    resolved = resolve_amp(amp, torch.device(device))[0]
    assert state["config"]["amp"] == amp and state["amp"] == resolved == _rows(run, "start")[0]["amp"]
    assert (state["scaler"] is not None) == (resolved == "fp16")
    assert all(np.isfinite(r["loss"]) for r in _rows(run, "train"))
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16 for v in state["state_dict"].values())


# ---------------------------------------------------------------------------- SIGKILL and resume

@needs_data
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Kill the training process (SIGKILL: no handler runs) after its second epoch checkpoint; ``--resume
    auto`` then reaches the same iteration count and bit-identical parameters as a run never interrupted."""
    args = ["--epochs", "6", "--eval_freq", "0", "--no-progress"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train = [sys.executable, "-m", "pspnet.train", "--config", str(CONFIG)]
    proc = subprocess.run(train + _tiny(straight, *args), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = subprocess.Popen(train + _tiny(killed, *args), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 600
    while not (killed / "epoch_0002.pth").exists():
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    victim.stderr.close()
    assert not (killed / "final.pth").exists()
    done_before = max(r["iter"] for r in _rows(killed, "train"))
    assert 4 <= done_before < 12

    proc = subprocess.run(train + _tiny(killed, *args, "--resume", "auto"), cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    a, b = load_checkpoint(straight / "final.pth"), load_checkpoint(killed / "final.pth")
    assert a["iteration"] == b["iteration"] == 12
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), k
    assert b["metrics"] == a["metrics"]


@needs_data
def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    from pspnet.trainer import Trainer
    run = tmp_path / "run"
    trainer = Trainer(load_config(str(CONFIG), _tiny(run, "--epochs", "3")), progress=False)
    forward, calls = trainer.net.forward, []

    def poisoned(*args, **kwargs):  # the 4th step's loss is NaN
        calls.append(1)
        pred, main, aux = forward(*args, **kwargs)
        return (pred, main * float("nan"), aux) if len(calls) == 4 else (pred, main, aux)

    trainer.net.forward = poisoned
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 4"):
        trainer.run()
    saved = run / "epoch_0001.pth"
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pth") == ["epoch_0001.pth"]
    assert load_checkpoint(saved)["iteration"] == 2 and trainer.iteration == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no step was taken on the NaN
