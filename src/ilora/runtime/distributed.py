"""The little ilora needs from torch.distributed: who am I, how many are we, wait for the others.

Under `torchrun` / `accelerate launch` every rank runs the same program on its share of each global
micro-batch. So that N processes compute what one process computes with the whole batch, the losses are
means over the global micro-batch (`share_of_mean`: DDP's gradient average then gives the gradient of
that mean) and every rank keeps the same replay buffer over every rank's rows (`gather_rows`), drawing
its share of one global replay draw. All ranks apply the same EMA to identical plastic weights, and
rank 0 alone writes task outputs and evaluates.
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


def share_of_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over every rank's micro-batch: `total` (this rank's sum) times the
    number of ranks over the count summed on all ranks, so that averaging the ranks' gradients (DDP,
    FSDP2, DeepSpeed) gives the gradient of the global mean. In one process, `total / count`. One
    all-reduce of a scalar, no host read."""
    if not active():
        return total / count.clamp_min(1)
    count = count.detach().to(torch.float64 if count.device.type == "cpu" else torch.float32).clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return total * dist.get_world_size() / count.clamp_min(1).to(total.dtype)


def gather_rows(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's rows (1-D tensors of one dtype, any lengths), in rank order, on every rank: the
    global micro-batch, so that every rank's replay buffer sees what one process would. Three
    all-gathers, two of them read on the host (the sizes)."""
    if not active():
        return rows
    world = dist.get_world_size()
    device = rows[0].device
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
    counts = _all_gather(torch.tensor([len(rows)], dtype=torch.int64, device=device), world)
    per_rank = [int(c) for c in torch.cat(counts).tolist()]
    padded_lengths = torch.zeros(max(per_rank), dtype=torch.int64, device=device)
    padded_lengths[: len(rows)] = lengths
    all_lengths = [t[:n].tolist() for t, n in zip(_all_gather(padded_lengths, world), per_rank)]
    longest = max(sum(ls) for ls in all_lengths)
    flat = torch.zeros(longest, dtype=rows[0].dtype, device=device)
    flat[: int(lengths.sum())] = torch.cat(rows)
    gathered = []
    for data, row_lengths in zip(_all_gather(flat, world), all_lengths):
        gathered += list(data[: sum(row_lengths)].split(row_lengths))
    return gathered


def _all_gather(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return parts


def share_of(items: list, ranks: int | None = None, rank_: int | None = None) -> list:
    """This rank's contiguous share of a list every rank holds in full (a global replay draw); ranks
    beyond the list's length take one item each, round-robin, so that no rank runs a step without
    what the others have (their forward passes must match under FSDP2)."""
    ranks = world_size() if ranks is None else ranks
    rank_ = rank() if rank_ is None else rank_
    if ranks == 1 or not items:
        return items
    if len(items) < ranks:
        return [items[rank_ % len(items)]]
    return items[rank_ * len(items) // ranks : (rank_ + 1) * len(items) // ranks]


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
