"""Data-parallel training across processes (`train.processes`, `forge train --gpus N`).

The detached trainer is started through torchrun, one process per GPU (or per CPU process with
`train.device = "cpu"`, over gloo). transformers' Trainer shards the rows and averages gradients;
what this module adds is what forge's run contract needs: one process (rank 0) owns the run's
files, and every process agrees on when to stop and where a checkpoint is being written.
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join the process group torchrun set up (no-op in a single process)."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def _active() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a stop signal reaches one process)."""
    return bool(_all_reduce(1 if flag else 0, "MAX"))


def sum_over_ranks(n: int) -> int:
    """The sum of every rank's `n` (each rank calls it at the same point)."""
    return _all_reduce(n, "SUM")


def _all_reduce(n: int, op: str) -> int:
    if not _active():
        return n
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())
