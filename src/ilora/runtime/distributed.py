"""The little ilora needs from torch.distributed: who am I, how many are we, wait for the others.

Under `torchrun` / `accelerate launch` every rank runs the same program; each keeps its own replay
buffer over its own data shard, all ranks apply the same EMA to identical plastic weights (DDP keeps
them identical), and rank 0 alone writes task outputs and evaluates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (a no-op in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(value: float) -> list[float]:
    """Every rank's float, on every rank (as a tensor collective: nothing is pickled)."""
    if not active():
        return [value]
    mine = torch.tensor([value], dtype=torch.float64)
    values = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(values, mine)
    return [v.item() for v in values]


def finish() -> None:
    """Leave the process group when this rank's work is done (no collective follows): left to the
    interpreter's teardown, gloo's threads may abort the process (SIGABRT) after its work is written."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
