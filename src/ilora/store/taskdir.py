"""What a task's output directory holds, and how the next task starts from it.

    <output_dir>/plastic/          PEFT adapter (safetensors), loadable with PeftModel.from_pretrained
    <output_dir>/<name>/           every other adapter the method saves (I-LoRA's stable one, which may
                                   also go to ema_adapter_path; O-LoRA's earlier tasks' LoRAs)
    <output_dir>/buffer/           replay buffer: buffer.safetensors + buffer.json (RNG state, num_seen);
                                   buffer/rank-<r>/ per rank in a multi-process run
    <output_dir>/method_state.safetensors   the method's tensors (EWC's Fisher), if any
    <output_dir>/ilora_task.json   manifest; written last, atomically: it marks the task as finished

Everything is first written under a staging directory and renamed into place, so a crash leaves
either the previous state or a finished task, never a half-written one that looks finished.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ilora.config.arguments import ContinualArguments
from ilora.core.adapters import (
    ADAPTER_CONFIG,
    AdapterPair,
    adapter_parameters,
    check_adapter_dir,
    save_adapter,
)
from ilora.core.buffer import BufferSpec, ReplayBuffer
from ilora.errors import ILoRAError, writing
from ilora.files import read_json, write_json
from ilora.runtime import distributed, sharding
from ilora.store.checkpoint import RESUME_LATEST
from ilora.store.identity import check_identity
from ilora.store.paths import TaskOutputs, check_directory_target, check_replaceable
from ilora.store.state import BUFFER_DIR, METHOD_STATE, buffer_path, read_method_state, write_method_state

MANIFEST = "ilora_task.json"
STAGING = ".ilora-staging"  # inside output_dir; only ilora ever creates a folder of this name
FORMAT_VERSION = 2
# What a manifest must hold, with the type of each value: anything else is a damaged file.
MANIFEST_KEYS = {
    "task_id": (str, type(None)),
    "method": str,
    "base_model": dict,
    "lora": dict,
    "sequence_steps": int,
    "global_steps": int,
    "adapters": dict,
}
LORA_KEYS = {"r": int, "lora_alpha": (int, float), "target_modules": (str, list)}


@dataclass
class TaskRecord:
    """What the trainer knows of a finished task; `write_task` makes the manifest of it."""

    method: str
    task_id: str | None
    prev_task_id: str | None
    base_model: dict  # store.identity.base_model_identity
    lora: dict  # store.identity.lora_identity
    sequence_steps: int  # optimizer steps since the sequence's first task began
    global_steps: int  # this task's optimizer steps
    continual_args: dict
    method_options: dict | None
    train_seconds: float | None  # of the session that finished the task
    hardware: dict  # what trained it, in which precision
    quantization: dict | None
    final_losses: dict  # the loss and every term the method logs, the whole task's mean train_loss
    collapse_check: dict  # the end-of-task collapse check's figures (methods.base)
    trainable_parameters: int  # elements of the tensors the optimizer trained
    rows_replayed: int  # replay rows drawn in the task, every rank's


# ------------------------------------------------------------------ reading
def is_finished(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path, role: str = "task directory") -> dict[str, Any]:
    """A finished task's manifest, checked: one line naming the file if it is damaged. `role` names the
    directory in errors ("previous_task_model", "--adapter", ...)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ILoRAError(f"{role} {directory}: no such directory")
    if not is_finished(directory):
        raise ILoRAError(f"{role} {directory}: not a finished ilora task (no {MANIFEST})")
    path = directory / MANIFEST
    manifest = read_json(path, "task manifest")
    if not isinstance(manifest, dict):
        raise ILoRAError(f"{path}: damaged task manifest (not a JSON object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ILoRAError(
            f"{path}: task format {manifest.get('format_version')!r}, this ilora reads format {FORMAT_VERSION} "
            "(train the task again)"
        )
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ILoRAError(f"{path}: damaged task manifest ('{key}' is {manifest.get(key)!r})")
    for key, kind in LORA_KEYS.items():
        if not isinstance(manifest["lora"].get(key), kind):
            raise ILoRAError(f"{path}: damaged task manifest (lora '{key}' is {manifest['lora'].get(key)!r})")
    if not isinstance(manifest["base_model"].get("fingerprint"), str):
        raise ILoRAError(f"{path}: damaged task manifest (no base model fingerprint)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["adapters"].items()):
        raise ILoRAError(f"{path}: damaged task manifest (adapters {manifest['adapters']!r})")
    return manifest


def saved_adapters(directory: Path, manifest: dict) -> dict[str, Path]:
    """Every adapter a finished task saved, by name."""
    return {name: _resolve(directory, path) for name, path in manifest["adapters"].items()}


def previous_adapters(directory: Path, manifest: dict, elsewhere: dict[str, Path]) -> dict[str, Path]:
    """The previous task's adapter directories by name (those in `elsewhere` read from there instead),
    each checked to be a PEFT adapter of the task's LoRA settings."""
    adapters = {**saved_adapters(directory, manifest), **elsewhere}
    for path in adapters.values():
        if not (path / ADAPTER_CONFIG).is_file():
            raise ILoRAError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        check_adapter_dir(path, manifest["lora"])
    return adapters


@dataclass
class PreviousTask:
    """What a chained task continues from, read and checked."""

    directory: Path
    manifest: dict
    adapters: dict[str, Path]
    buffer: ReplayBuffer | None
    method_state: tuple[dict[str, torch.Tensor], dict]

    @property
    def steps(self) -> int:
        """Optimizer steps since the first task began (I-LoRA's EMA counts from there)."""
        return self.manifest["sequence_steps"]

    @property
    def lora(self) -> dict:
        return self.manifest["lora"]

    @property
    def task_id(self) -> str | None:
        return self.manifest.get("task_id")


@dataclass
class Expected:
    """What the continuing task is: checked against the previous task before anything is loaded from it."""

    method: str
    lora: dict | None  # None: take the previous task's
    base: dict  # store.identity.base_model_identity of the base at hand
    quantization: dict | None
    prev_task_id: str | None


def load_previous(
    directory: Path,
    expected: Expected,
    elsewhere: dict[str, Path],
    buffer_spec: BufferSpec | None,
    world_size: int,
    rank: int,
) -> PreviousTask:
    """The previous task's manifest (same method, LoRA settings, base and quantization), its adapters
    (those in `elsewhere` read from there), this rank's buffer (when `buffer_spec` is given) and its
    method state."""
    manifest = read_manifest(directory, "previous_task_model")
    if manifest.get("quantization") != expected.quantization:
        raise ILoRAError(
            f"{directory} was trained on a base loaded as {_bits(manifest.get('quantization'))}; this task "
            f"loads it as {_bits(expected.quantization)}: use the same quantization_bit"
        )
    if expected.prev_task_id is not None and manifest.get("task_id") != expected.prev_task_id:
        raise ILoRAError(
            f"prev_task_id={expected.prev_task_id!r} but {directory} holds task {manifest.get('task_id')!r}"
        )
    check_identity(manifest, directory, expected.base, expected.lora or manifest["lora"])
    if manifest["method"] != expected.method:
        raise ILoRAError(
            f"{directory} was trained with method {manifest['method']!r}; a chained task "
            f"continues with the same method, not {expected.method!r}"
        )
    adapters = previous_adapters(directory, manifest, elsewhere)
    buffer = None
    if buffer_spec is not None:
        if manifest.get("buffer") is None:
            raise ILoRAError(f"{directory}: the previous task saved no replay buffer")
        ranks = manifest["buffer"].get("ranks", 1)
        if ranks != world_size:
            raise ILoRAError(f"{directory} kept {ranks} per-rank replay buffers; this run has {world_size} processes")
        buffer = ReplayBuffer.load(buffer_path(directory / BUFFER_DIR, ranks, rank), buffer_spec)
    return PreviousTask(
        directory, manifest, adapters, buffer, read_method_state(directory, manifest.get("method_state"))
    )


def _bits(quantization: dict | None) -> str:
    if quantization is None:
        return "full precision"
    return f"{quantization['bits']}-bit" + (f" {quantization['type']}" if quantization.get("type") else "")


# ------------------------------------------------------------ before writing
def planned_outputs(
    output_dir: str | None,
    method_cls,
    continual: ContinualArguments,
    options,
    overwrite: bool,
    resume_from: str | None = None,
) -> TaskOutputs:
    """Everything a task will write and read, checked before the model loads (see `store.paths`): the
    method says which adapters it saves and where."""
    if not output_dir:
        raise ILoRAError("--output_dir is required")
    output = Path(output_dir)
    check_directory_target(output, "output_dir")  # before anything looks inside it
    reads: dict[str, Path] = {}
    previous_names: list[str] = []
    if continual.previous_task_model:
        previous = Path(continual.previous_task_model)
        manifest = read_manifest(previous, "previous_task_model")
        reads["previous_task_model"] = previous
        elsewhere = method_cls.previous_adapter_locations(options)
        for name, path in {**saved_adapters(previous, manifest), **elsewhere}.items():
            reads[f"previous {name} adapter"] = path
        previous_names = list(manifest["adapters"])
    if resume_from and resume_from not in RESUME_LATEST:
        reads["resume_from_checkpoint"] = Path(resume_from)
    adapters = adapter_targets(output, method_cls, options, previous_names, bool(continual.previous_task_model))
    outputs = TaskOutputs(output, adapters, reads, overwrite)
    outputs.check(is_finished(output))
    return outputs


def adapter_targets(output_dir: Path, method_cls, options, previous: list[str], chained: bool) -> dict[str, Path]:
    """Where each adapter the task saves is written: `output_dir/<name>` unless the method says otherwise."""
    elsewhere = method_cls.adapter_locations(output_dir, options, chained)
    return {name: elsewhere.get(name, output_dir / name) for name in method_cls.saved_adapters(options, previous)}


# ------------------------------------------------------------------ writing
def write_task(
    output_dir: str | Path,
    model: PeftModel,
    buffer: ReplayBuffer | None,
    record: TaskRecord,
    targets: dict[str, Path],
    method_state: tuple[dict[str, torch.Tensor], dict] = ({}, {}),
) -> Path:
    """Write a finished task: the adapters `targets` names (as PEFT directories, where it says), buffers
    and the method's state via a staging directory, the manifest last.

    Called on every rank: each writes its copy of the buffer (the same on every rank), rank 0 the rest."""
    output_dir = Path(output_dir)
    staging = output_dir / STAGING
    if distributed.rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    if buffer is not None:
        buffer.save(buffer_path(staging / BUFFER_DIR))
    checksums = distributed.gather(AdapterPair(model).checksum())  # a collective: every rank
    whole = sharding.full_state(adapter_parameters(model)) if sharding.is_sharded(model) else None
    buffers = distributed.gather(float(buffer.num_seen)) if buffer is not None else None
    distributed.barrier()
    if distributed.rank() == 0:
        try:
            with writing(output_dir):  # a full disk: one line, exit 1; the staging folder is cleared on retry
                write_method_state(staging, method_state[0])
                _publish(output_dir, staging, model, targets, whole)
        except OSError as err:  # permissions and the like: say so in one line; nothing is marked finished
            raise ILoRAError(f"could not write the task to {output_dir}: {err}; it is not marked finished") from None
        adapters = {name: _relative(path, output_dir) for name, path in targets.items()}
        write_json(output_dir / MANIFEST, _manifest(record, adapters, method_state[1], checksums, buffer, buffers))
    distributed.barrier()  # nobody moves on before the task is finished
    return output_dir


def _manifest(record: TaskRecord, adapters: dict, method_record: dict, checksums, buffer, seen_per_rank) -> dict:
    """The manifest, assembled here and nowhere else."""
    return {
        "format_version": FORMAT_VERSION,
        **asdict(record),
        "adapters": adapters,
        "method_state": method_record,
        "adapter_checksum_per_rank": checksums,  # equal on every rank: the ranks trained one model
        "buffer": None if buffer is None else _buffer_record(buffer, seen_per_rank),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _buffer_record(buffer: ReplayBuffer, seen_per_rank: list[float]) -> dict:
    return {
        "size": len(buffer),
        "policy": buffer.policy,
        "budget": {"capacity": buffer.capacity, "unit": buffer.unit, "used": buffer.used()},
        "num_seen": buffer.num_seen,
        "ranks": distributed.world_size(),
        "num_seen_per_rank": [int(n) for n in seen_per_rank],
        "bytes_per_row": buffer.bytes_per_row(),
    }


def _publish(
    output_dir: Path, staging: Path, model: PeftModel, targets: dict[str, Path], whole: dict[str, torch.Tensor] | None
) -> None:
    """Adapters into the staging directory (from `whole`, the gathered tensors, if the model is
    sharded), then everything renamed into place. An earlier manifest (with --overwrite_output_dir)
    goes first, so a crash half-way leaves a task that is not finished."""
    for name in targets:
        save_adapter(model, name, staging / name, whole)
    (output_dir / MANIFEST).unlink(missing_ok=True)
    for name, target in targets.items():
        _replace(staging / name, target, "adapter")
    _replace(staging / BUFFER_DIR, output_dir / BUFFER_DIR, "buffer")
    if (staging / METHOD_STATE).exists():
        os.replace(staging / METHOD_STATE, output_dir / METHOD_STATE)
    else:
        (output_dir / METHOD_STATE).unlink(missing_ok=True)  # an earlier task's, when overwriting
    shutil.rmtree(staging)


def _replace(source: Path, target: Path, kind: str) -> None:
    """Move a staged output into place. Only ilora's own output of the same kind is ever deleted for it
    (checked here again, at the deletion, whatever the caller checked before)."""
    if not source.exists():
        return
    if target.exists() or target.is_symlink():
        check_replaceable(target, kind, allowed=True, what=f"{kind} target")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _resolve(directory: Path, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else directory / path
