"""What ilora adds to the Trainer's `checkpoint-<step>` folders, and how a resume reads it back.

    checkpoint-<step>/.ilora-checkpoint        claimed by ilora before the Trainer writes (store.paths)
    checkpoint-<step>/...                      the Trainer's own: adapters, optimizer, scheduler, RNG
    checkpoint-<step>/ilora_buffer/            every rank's replay buffer
    checkpoint-<step>/method_state.safetensors the method's tensors
    checkpoint-<step>/ilora_adapters_sharded/  every adapter, when the Trainer's checkpoint would miss some
                                               (FSDP2 keeps the active one, DeepSpeed no frozen one)
    checkpoint-<step>/ilora_checkpoint.json    the marker, written last: the checkpoint is complete

A resume continues bitwise: the marker carries the sequence's step count (I-LoRA's EMA counts from the
first task), the method's state, the task's running loss and the identity it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ilora.core.adapters import ADAPTER_CONFIG, check_adapter_dir
from ilora.core.buffer import ReplayBuffer
from ilora.errors import ILoRAError
from ilora.files import read_json, write_json
from ilora.runtime import distributed, sharding
from ilora.store.identity import check_identity
from ilora.store.paths import CHECKPOINT_CLAIM, CHECKPOINT_MARKER, CHECKPOINT_PREFIX, is_ilora_checkpoint
from ilora.store.state import buffer_path, read_method_state, write_method_state

CHECKPOINT_BUFFER = "ilora_buffer"
SHARDED_ADAPTERS = "ilora_adapters_sharded"
RESUME_LATEST = ("true", "True", "last")  # resume_from_checkpoint values meaning "the newest complete one"
FORMAT_VERSION = 2
# the marker's keys
STEPS, TASK_ID, TASK_LOSS, METHOD_RECORD = "sequence_steps", "task_id", "task_loss", "method_state"


@dataclass
class CheckpointState:
    """What a resume restores besides the Trainer's own state."""

    steps: int  # optimizer steps since the sequence's first task began
    buffer: ReplayBuffer | None  # this rank's
    method_state: tuple[dict[str, torch.Tensor], dict]
    task_loss: dict  # {"sum", "micro_batches", "rows_replayed"} of the task so far (Method.task_loss)


def is_complete_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that was completely written; half-written ones are ignored."""
    candidates = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and is_complete_checkpoint(path):
            candidates.append((int(suffix), path))
    return max(candidates)[1] if candidates else None


def claim_checkpoint(folder: Path) -> None:
    """Mark `folder` as ilora's before the Trainer writes into it; refuse one that is someone else's
    (made while training ran: the start-up check has seen every earlier one). A collective: rank 0 alone
    looks and claims (another rank looking while it claims could see the folder half-claimed), and every
    rank learns the answer."""
    claimed = True
    if distributed.rank() == 0:
        claimed = not folder.exists() or is_ilora_checkpoint(folder)
        if claimed:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CHECKPOINT_CLAIM).touch()
    if not all(distributed.gather(float(claimed))):
        raise ILoRAError(
            f"{folder} appeared during training and was not written by ilora; "
            "ilora never touches it: move it, then resume"
        )


def save_checkpoint_state(folder: Path, state: CheckpointState, task_id: str | None, identity: dict) -> None:
    """Every rank's buffer, the method's state, and last the marker that says the checkpoint is complete.
    `identity`: base model and LoRA settings, compared on resume."""
    if state.buffer is not None:  # every rank saves its copy of the buffer
        state.buffer.save(buffer_path(folder / CHECKPOINT_BUFFER))
    distributed.barrier()
    if distributed.rank() == 0:
        write_method_state(folder, state.method_state[0])
        marker = {
            "format_version": FORMAT_VERSION,
            STEPS: state.steps,
            TASK_ID: task_id,
            METHOD_RECORD: state.method_state[1],
            TASK_LOSS: state.task_loss,
            **identity,
        }
        write_json(folder / CHECKPOINT_MARKER, marker)


def sharded_adapters(folder: Path) -> Path:
    """A checkpoint's adapters written by ilora itself (a run under FSDP2 or DeepSpeed), checked to be there."""
    path = folder / SHARDED_ADAPTERS
    if not any((path / name).is_file() for name in (".metadata", sharding.PARTITIONED_ADAPTERS)):
        raise ILoRAError(
            f"{folder}: no {SHARDED_ADAPTERS} (written by a run that was not sharded); resume it the way it ran"
        )
    return path


def load_checkpoint_state(folder: Path, with_buffer: bool, identity: dict) -> CheckpointState:
    """Check a checkpoint before the Trainer reads it: complete, of this format, trained on this base with
    these LoRA settings, its adapters and buffer readable."""
    if not is_complete_checkpoint(folder):
        raise ILoRAError(f"{folder}: not a complete ilora checkpoint (no {CHECKPOINT_MARKER})")
    path = folder / CHECKPOINT_MARKER
    marker = read_json(path, "checkpoint marker")
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        version = marker.get("format_version") if isinstance(marker, dict) else None
        raise ILoRAError(f"{path}: checkpoint format {version!r}, this ilora reads format {FORMAT_VERSION}")
    if not isinstance(marker.get(STEPS), int) or isinstance(marker.get(STEPS), bool):
        raise ILoRAError(f"{path}: damaged checkpoint marker (no integer {STEPS})")
    if not isinstance(marker.get("base_model"), dict) or not isinstance(marker["base_model"].get("fingerprint"), str):
        raise ILoRAError(f"{path}: damaged checkpoint marker (no base model fingerprint)")
    check_identity(marker, folder, identity["base_model"], identity["lora"])
    task_loss = marker.get(TASK_LOSS)
    if not (
        isinstance(task_loss, dict)
        and isinstance(task_loss.get("micro_batches"), int)
        and isinstance(task_loss.get("sum"), (int, float))
        and isinstance(task_loss.get("rows_replayed", 0), int)
    ):
        raise ILoRAError(f"{path}: damaged checkpoint marker (task_loss {task_loss!r})")
    for adapter in folder.iterdir():
        if (adapter / ADAPTER_CONFIG).is_file():
            check_adapter_dir(adapter)
    read_json(folder / "trainer_state.json", "trainer state")
    buffer = ReplayBuffer.load(buffer_path(folder / CHECKPOINT_BUFFER)) if with_buffer else None
    return CheckpointState(marker[STEPS], buffer, read_method_state(folder, marker.get(METHOD_RECORD)), task_loss)
