"""torch.distributed helpers: cachequant runs unchanged on one process or under ``torchrun``.

Work is split by *global* batch index (batch b goes to rank b mod K) and every per-batch result is
gathered to rank 0 and combined there in batch order, so a K-process run computes exactly what a
single process computes, bit for bit.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int, str]:
    """Initialises the process group when launched by torchrun / accelerate (WORLD_SIZE > 1):
    NCCL with one GPU per process for CUDA, gloo on the CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), device


def mine(items: Sequence[T]) -> list[tuple[int, T]]:
    """(global index, item) pairs this rank works on."""
    rank, world = rank_world()
    return [(i, x) for i, x in enumerate(items) if i % world == rank]


def gather(obj: Any) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def merge_by_index(parts: list[dict] | None) -> list:
    """Rank 0: the values of the gathered {global index: value} dicts, in index order."""
    merged: dict = {}
    for p in parts or []:
        merged.update(p)
    return [merged[i] for i in sorted(merged)]


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def solve_on_rank0(local: dict[int, Any], solve) -> Any:
    """Every rank's per-batch results ``{global batch index: value}`` gathered on rank 0, where
    ``solve(values in batch order)`` runs; its result is returned on every rank. Batch order makes
    a K-process calibration compute what one process computes."""
    parts = gather(local)
    out = solve(merge_by_index(parts)) if rank_world()[0] == 0 else None
    return broadcast(out)
