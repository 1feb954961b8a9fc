"""Process group and device set-up for ``pspnet.train`` (one process, or one per GPU
under ``torchrun``), and the few collectives the trainer needs.

``torchrun --nproc_per_node=K -m pspnet.train ...`` starts K processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set; :func:`setup` reads them, joins the group (NCCL
on CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``. Without those variables it is a single process
and no group is created. semseg's ``tool/train.py`` does the same with ``mp.spawn``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "cleanup", "resolve_device"]


@dataclass(frozen=True)
class DistContext:
    """Where this process runs.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes (1 = not distributed).
        local_rank: rank on this node (the CUDA device index under torchrun).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes in place (no-op for one process); returns it. With NCCL the
        tensor travels through this process's device and comes back in its dtype and device."""
        if not self.distributed:
            return tensor
        moved = tensor.to(self.device) if dist.get_backend() == "nccl" else tensor
        dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order (``[obj]`` for one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) of ``module`` to every process, as DDP does
        before each training forward; without SyncBatchNorm each process's last step leaves its own."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), got {value!r}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device for config ``device`` ``name`` (``auto``, ``cpu`` or ``cuda``).

    ``auto`` is CUDA when available, else CPU; CUDA means ``cuda:local_rank``.

    Raises:
        ValueError: an unknown name, ``cuda`` without a usable CUDA device, or ``local_rank`` beyond the
            visible CUDA devices.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config key 'device': expected auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda requested but torch.cuda.is_available() is False")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment has one, and pick this process's device.

    Args:
        device: config ``device`` (``auto``, ``cpu`` or ``cuda``).
    Returns:
        the :class:`DistContext`; ``world_size == 1`` without torchrun's variables.
    Raises:
        ValueError: bad ``device`` or environment values (see :func:`resolve_device`).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
