"""What task directories and checkpoints both hold besides adapters: the method's state (tensors in
safetensors, the rest as JSON in the manifest or marker; never pickle) and the replay buffers (one
per rank in a multi-process run)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ilora.errors import ILoRAError
from ilora.runtime import distributed

METHOD_STATE = "method_state.safetensors"  # a method's tensors (EWC's Fisher)
BUFFER_DIR = "buffer"


def buffer_path(root: Path, world_size: int | None = None, rank: int | None = None) -> Path:
    """`root` in one process; `root/rank-<r>/` when every rank keeps its own reservoir."""
    world_size = distributed.world_size() if world_size is None else world_size
    rank = distributed.rank() if rank is None else rank
    return root if world_size == 1 else root / f"rank-{rank}"


def write_method_state(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The method's tensors into `folder` (nothing when it has none)."""
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / METHOD_STATE))


def read_method_state(directory: Path, record: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    """A method's saved state: tensors from `method_state.safetensors`, the rest (`record`) from the
    manifest or checkpoint marker."""
    record = record or {}
    path = directory / METHOD_STATE
    if not path.is_file():
        if record:
            raise ILoRAError(f"{path}: missing (the method's saved state)")
        return {}, record
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ILoRAError(f"{path}: damaged method state ({' '.join(str(err).split())})") from None
    for name, tensor in tensors.items():  # a NaN Fisher or subspace would only surface as a diverged task
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ILoRAError(f"{path}: '{name}' holds NaN or inf (the method's saved state is damaged)")
    return tensors, record
