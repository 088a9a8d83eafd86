"""What ilora needs from a model whose parameters FSDP2 has sharded (`fully_shard`: DTensor parameters,
each rank holding a dim-0 slice).

The plastic and stable LoRA tensors of one layer have the same shapes, so FSDP2 slices them the same
way: the EMA is exact on each rank's local slice, with no communication. Only saving needs whole
tensors, gathered from every rank (adapter-sized, never the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's slice on this rank (the tensor itself when it is not sharded); in-place updates
    of a slice update the sharded parameter."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whole, differentiably: a sharded one is gathered (its gradient flows back to this
    rank's slice), any other is itself. For terms computed on the parameters outside the forward."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor whole, on the CPU, keyed as in `model.state_dict()`. A collective: every rank
    calls it, in the same order, and every rank receives the whole tensors."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            continue
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        state[name] = whole.detach().to("cpu", copy=True)  # own storage: PEFT's save reads storage pointers
    return state


def save_adapters(model: torch.nn.Module, directory: Path) -> None:
    """Every rank's slices of every LoRA tensor, as a torch.distributed.checkpoint directory (a
    collective). Accelerate's FSDP checkpoint keeps only the active adapter, DeepSpeed's leaves every
    frozen one out (its tensors are whole on every rank: written once); the stable one (and any other
    a method adds) must survive a crash too."""
    dcp.save(_adapter_slices(model), checkpoint_id=str(directory))


def load_adapters(model: torch.nn.Module, directory: Path) -> None:
    """Read `save_adapters`' directory back into the sharded parameters, in place (a collective)."""
    dcp.load(_adapter_slices(model), checkpoint_id=str(directory))


def _adapter_slices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # FSDP2's state dict holds the sharded parameters themselves (detached views): loading into it
    # writes the parameters
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
