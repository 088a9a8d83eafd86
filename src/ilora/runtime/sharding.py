"""What ilora needs from a model whose parameters are sharded over the ranks: by FSDP2 (`fully_shard`:
DTensor parameters, each rank holding a dim-0 slice) or by DeepSpeed ZeRO-3 (each parameter's data is
empty outside the forward; `ds_tensor` holds this rank's share of its flattened elements).

The plastic and stable LoRA tensors of one layer have the same shapes, so both schemes cut them the
same way: the EMA is exact on each rank's local part, with no communication. Only saving needs whole
tensors, gathered from every rank (adapter-sized, never the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from ilora.errors import ILoRAError
from ilora.runtime import distributed

PARTITIONED_ADAPTERS = "adapters.safetensors"  # ZeRO-3: every adapter whole, in save_adapters' directory


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters()) or is_partitioned(model)


def is_partitioned(model: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 has partitioned the model's parameters."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's part on this rank (the tensor itself when it is not sharded); in-place updates
    of a part update the sharded parameter. A ZeRO-3 part is a view of the partition's current
    storage, which DeepSpeed's optimizer re-points: ask again after every step."""
    return [
        t.to_local() if isinstance(t, DTensor) else _partition(t) if hasattr(t, "ds_tensor") else t for t in tensors
    ]


def shape(tensor: torch.Tensor) -> torch.Size:
    """The parameter's whole shape (a partitioned one's own data is empty outside the forward)."""
    return tensor.ds_shape if hasattr(tensor, "ds_tensor") else tensor.shape


def _partition(param: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter (flattened, rank r holding the r-th equal share),
    without the padding DeepSpeed leaves uninitialised at the end of the last shares."""
    part = param.ds_tensor.data
    valid = max(0, min(part.numel(), param.ds_numel - _first_element(param)))
    return part.narrow(0, 0, valid)


def _first_element(param: torch.Tensor) -> int:
    return torch.distributed.get_rank(param.ds_process_group) * param.ds_tensor.numel()


def release_gathered(params: list[torch.Tensor]) -> None:
    """Free the whole copies ZeRO-3 keeps of small ("persistent") parameters between forwards: after
    their partitions change (the EMA, a restore) those copies are stale; the next forward gathers
    them again from the partitions."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(param_list=gathered)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whole, differentiably: a sharded one is gathered (its gradient flows back to this
    rank's slice), any other is itself. For terms computed on the parameters outside the forward."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole `value` into `param`, sharded by FSDP2 or not. A collective when sharded: every rank
    calls it, in the same order, with the same value (InfLoRA's designed down-projections)."""
    if isinstance(param, DTensor):
        from torch.distributed.tensor import distribute_tensor

        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value.to(param.dtype))


@torch.no_grad()
def full_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors `params` names, whole, on the CPU (own storage: PEFT's save reads storage pointers).
    A collective: every rank calls it, in the same order, and every rank receives the whole tensors."""
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):  # whole on every rank, read-only
            return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    return {name: whole(p).detach().to("cpu", copy=True) for name, p in params.items()}


def save_adapters(params: dict[str, torch.Tensor], directory: Path) -> None:
    """The adapters' tensors `params` (a collective). Accelerate's FSDP checkpoint keeps only the active
    adapter, DeepSpeed's leaves every frozen one out; the stable one (and any other a method adds) must
    survive a crash too. FSDP2: every rank's slices, as a torch.distributed.checkpoint directory. ZeRO-3:
    the tensors gathered whole (adapter-sized) into one file by rank 0, so any number of ranks reads it.
    Otherwise (ZeRO-0/1/2) the tensors are whole on every rank: dcp writes them once."""
    if not any(hasattr(p, "ds_tensor") for p in params.values()):
        dcp.save(_detached(params), checkpoint_id=str(directory))
        return
    state = full_state(params)
    if distributed.rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / PARTITIONED_ADAPTERS))
    distributed.barrier()


def load_adapters(params: dict[str, torch.Tensor], directory: Path) -> None:
    """Read `save_adapters`' directory back into the sharded parameters `params`, in place."""
    if not any(hasattr(p, "ds_tensor") for p in params.values()):
        if not (directory / ".metadata").is_file():
            raise ILoRAError(f"{directory.parent}: written by a run under ZeRO-3; resume it the way it ran")
        dcp.load(_detached(params), checkpoint_id=str(directory))  # a collective
        return
    if not (directory / PARTITIONED_ADAPTERS).is_file():
        raise ILoRAError(f"{directory.parent}: written by a run not under ZeRO-3; resume it the way it ran")
    state = load_file(str(directory / PARTITIONED_ADAPTERS))
    with torch.no_grad():
        for name, param in params.items():
            part = _partition(param)
            start = _first_element(param)
            part.copy_(state[name].flatten()[start : start + part.numel()])
    release_gathered(list(params.values()))


def _detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views sharing the parameters' storage (DTensors stay DTensors): loading into them writes the
    parameters, as loading into FSDP2's state dict does."""
    return {name: p.detach() for name, p in params.items()}
