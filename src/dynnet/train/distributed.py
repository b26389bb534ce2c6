"""torch.distributed helpers: launched by ``torchrun`` or not, the training code calls the same functions."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_cat", "all_reduce_sum", "broadcast_state_", "init_distributed", "is_main_process", "rank", "world_size",
]  # fmt: skip


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0: the only process that writes logs and checkpoints."""
    return rank() == 0


def init_distributed(device: str | None) -> torch.device:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and pick the device.

    The backend is NCCL on CUDA and Gloo on CPU; an already initialised group is kept as it is.

    Args:
        device: the requested device; ``None`` means ``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU.

    Returns:
        The device this process trains on.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over all processes (``values`` itself when not distributed)."""
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate Tensor[n_r, ...] of every rank along dim 0 (ranks may hold different n_r)."""
    if world_size() == 1:
        return x
    parts: list[Tensor | None] = [None] * world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat([p for p in parts if p is not None]).to(x.device)


def broadcast_state_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to the other processes, in place (a no-op
    when not distributed): for state a process changed outside the optimiser (a calibrated threshold)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for value in module.state_dict(keep_vars=True).values():
            dist.broadcast(value.data, src=src)
