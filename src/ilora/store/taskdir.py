"""What a task's output directory holds, and how the next task starts from it.

    <output_dir>/plastic/          PEFT adapter (safetensors), loadable with PeftModel.from_pretrained
    <output_dir>/stable/           the same for the stable adapter (or at ema_adapter_path)
    <output_dir>/buffer/           replay buffer: buffer.safetensors + buffer.json (RNG state, num_seen);
                                   buffer/rank-<r>/ per rank in a multi-process run
    <output_dir>/ilora_task.json   manifest; written last, atomically: it marks the task as finished

Everything is first written under a staging directory and renamed into place, so a crash leaves
either the previous state or a finished task, never a half-written one that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ilora.config.parse import ILoRAArguments
from ilora.core.adapters import ADAPTER_CONFIG, PLASTIC, STABLE, AdapterPair, check_adapter_dir, save_adapter
from ilora.core.buffer import ReplayBuffer
from ilora.errors import ILoRAError, writing
from ilora.files import read_json, write_json
from ilora.runtime import distributed, sharding
from ilora.store.paths import (
    CHECKPOINT_CLAIM,
    CHECKPOINT_MARKER,
    TaskOutputs,
    check_directory_target,
    check_replaceable,
    is_ilora_checkpoint,
)

MANIFEST = "ilora_task.json"
METHOD_STATE = "method_state.safetensors"  # a method's tensors (EWC's Fisher), in task directories and checkpoints
CHECKPOINT_BUFFER = "ilora_buffer"
SHARDED_ADAPTERS = "ilora_adapters_sharded"  # under FSDP2: every adapter's slices (torch.distributed.checkpoint)
STAGING = ".ilora-staging"  # inside output_dir; only ilora ever creates a folder of this name
FORMAT_VERSION = 1
RESUME_LATEST = ("true", "True", "last")  # resume_from_checkpoint values meaning "the newest complete one"
# What a manifest must hold, with the type of each value: anything else is a damaged file.
MANIFEST_KEYS = {
    "task_id": (str, type(None)),
    "base_model": dict,
    "lora": dict,
    "ema_step": int,
    "global_steps": int,
    "ilora_args": dict,
}
LORA_KEYS = {"r": int, "lora_alpha": (int, float), "target_modules": (str, list)}


def is_finished(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ILoRAError(f"previous_task_model {directory}: no such directory")
    if not is_finished(directory):
        raise ILoRAError(f"previous_task_model {directory}: not a finished ilora task (no {MANIFEST})")
    path = directory / MANIFEST
    manifest = read_json(path, "task manifest")
    if not isinstance(manifest, dict):
        raise ILoRAError(f"{path}: damaged task manifest (not a JSON object)")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ILoRAError(f"{path}: damaged task manifest ('{key}' is {manifest.get(key)!r})")
    for key, kind in LORA_KEYS.items():
        if not isinstance(manifest["lora"].get(key), kind):
            raise ILoRAError(f"{path}: damaged task manifest (lora '{key}' is {manifest['lora'].get(key)!r})")
    if not isinstance(manifest["base_model"].get("fingerprint"), str):
        raise ILoRAError(f"{path}: damaged task manifest (no base model fingerprint)")
    return manifest


def lora_identity(config: LoraConfig) -> dict[str, Any]:
    """The LoRA settings a chained task must share with its predecessor."""
    targets = config.target_modules
    if not isinstance(targets, str):
        targets = sorted(targets)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": targets, "use_dora": config.use_dora}


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer does, by content: vocabulary, special tokens, chat template."""
    record = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def base_model_identity(model: torch.nn.Module, tokenizer=None) -> dict[str, Any]:
    """Name and a fingerprint of the base weights: the config's shape plus the first and last values
    of every weight tensor, so base weights replaced at the same path are told apart (cheap: a few
    values per tensor, not the whole model); with `tokenizer`, its digest too."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = base.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    for name, tensor in base.named_parameters():
        if ".lora_" in name:  # adapters are not the base model
            continue
        flat = tensor.detach().reshape(-1)
        digest.update(name.replace(".base_layer", "").encode() + str(tuple(tensor.shape)).encode())
        digest.update(torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes())
    identity = {"name_or_path": config.get("_name_or_path", ""), "fingerprint": digest.hexdigest()[:16]}
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer_digest(tokenizer)
    return identity


def check_identity(recorded: dict, directory: Path, base: dict, lora: dict | None = None) -> None:
    """The one comparison every route makes before it continues, evaluates, exports or resumes a task:
    `recorded` is what the task or checkpoint wrote (`base_model`, `lora`), `base` the identity of the
    base model and tokenizer at hand, `lora` the LoRA settings about to be used (None: not compared).
    A tokenizer is compared where both sides recorded one (manifests of older ilora did not)."""
    before = recorded["base_model"]
    if before["fingerprint"] != base["fingerprint"]:
        raise ILoRAError(
            f"{directory} was trained on base model {before.get('name_or_path')!r}; {base['name_or_path']!r} "
            "holds other weights: a task is continued, evaluated and exported on the base it was trained on"
        )
    if before.get("tokenizer") and base.get("tokenizer") and before["tokenizer"] != base["tokenizer"]:
        raise ILoRAError(
            f"{directory} was trained with another tokenizer than {base['name_or_path']!r}'s (vocabulary, "
            "special tokens or chat template differ): the same token ids would stand for other text"
        )
    if lora is not None and recorded.get("lora") != lora:
        raise ILoRAError(
            f"LoRA config {lora} does not match {recorded.get('lora')}, the one {directory} was trained with"
        )


def check_compatible(manifest: dict, directory: Path, lora: dict, base: dict, prev_task_id: str | None) -> None:
    if prev_task_id is not None and manifest.get("task_id") != prev_task_id:
        raise ILoRAError(f"prev_task_id={prev_task_id!r} but {directory} holds task {manifest.get('task_id')!r}")
    check_identity(manifest, directory, base, lora)


def manifest_method(manifest: dict) -> str:
    """The method that trained a task (manifests written before `method` existed say it by switches)."""
    if isinstance(manifest.get("method"), str):
        return manifest["method"]
    args = manifest.get("ilora_args", {})
    return (
        "seq_lora" if args.get("use_ilora") is False else "er" if args.get("use_stable_adapter") is False else "ilora"
    )


def saved_adapters(directory: Path, manifest: dict) -> dict[str, Path]:
    """Every adapter a finished task saved, by name (older manifests list only plastic and stable)."""
    listed = manifest.get("adapters")
    if not isinstance(listed, dict):
        listed = {PLASTIC: PLASTIC, **({STABLE: manifest["stable_path"]} if manifest.get("stable_path") else {})}
    return {name: _resolve(directory, path) for name, path in listed.items()}


def previous_adapters(directory: Path, manifest: dict, ema_adapter_path: str | None) -> dict[str, Path]:
    """The previous task's adapter directories by name, each checked to load (`ema_adapter_path`, if
    given, is where its stable adapter is read)."""
    adapters = saved_adapters(directory, manifest)
    if ema_adapter_path:
        adapters[STABLE] = Path(ema_adapter_path)
    for path in adapters.values():
        if not (path / ADAPTER_CONFIG).is_file():
            raise ILoRAError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        check_adapter_dir(path, manifest["lora"])
    return adapters


def previous_stable_path(directory: Path, manifest: dict, ema_adapter_path: str | None) -> Path | None:
    """Where a chained task reads the previous stable adapter: ema_adapter_path, else where it was saved."""
    return Path(ema_adapter_path) if ema_adapter_path else saved_adapters(directory, manifest).get(STABLE)


@dataclass
class PreviousTask:
    """What a chained task continues from, read and checked."""

    directory: Path
    manifest: dict
    adapters: dict[str, Path]
    buffer: ReplayBuffer | None
    method_state: tuple[dict[str, torch.Tensor], dict]

    @property
    def step(self) -> int:
        """Optimizer steps since the first task began (I-LoRA's EMA counts from there)."""
        return int(self.manifest.get("ema_step", 0))

    @property
    def lora(self) -> dict:
        return self.manifest["lora"]

    @property
    def task_id(self) -> str | None:
        return self.manifest.get("task_id")


def load_previous(
    directory: Path,
    args: ILoRAArguments,
    lora: dict | None,
    base: dict,
    buffer_capacity: int | None,
    world_size: int,
    process_index: int,
    quantization: dict | None = None,
) -> PreviousTask:
    """The previous task's manifest (same method, LoRA and base model), adapters, this rank's buffer
    (when `buffer_capacity` is given) and method state."""
    manifest = read_manifest(directory)
    if manifest.get("quantization") != quantization:
        raise ILoRAError(
            f"{directory} was trained on a base loaded as {_bits(manifest.get('quantization'))}; this task "
            f"loads it as {_bits(quantization)}: use the same quantization_bit"
        )
    check_compatible(manifest, directory, lora or manifest["lora"], base, args.prev_task_id)
    if manifest_method(manifest) != args.method:
        raise ILoRAError(
            f"{directory} was trained with method {manifest_method(manifest)!r}; a chained task "
            f"continues with the same method, not {args.method!r}"
        )
    adapters = previous_adapters(directory, manifest, args.ema_adapter_path)
    buffer = None
    if buffer_capacity is not None:
        if manifest.get("buffer") is None:
            raise ILoRAError(f"{directory}: the previous task saved no replay buffer")
        ranks = manifest["buffer"].get("ranks", 1)
        if ranks != world_size:
            raise ILoRAError(f"{directory} kept {ranks} per-rank replay buffers; this run has {world_size} processes")
        buffer = ReplayBuffer.load(buffer_path(directory / "buffer", ranks, process_index), capacity=buffer_capacity)
    return PreviousTask(directory, manifest, adapters, buffer, read_method_state(directory, manifest))


def _bits(quantization: dict | None) -> str:
    return (
        "full precision"
        if quantization is None
        else f"{quantization['bits']}-bit" + (f" {quantization['type']}" if quantization.get("type") else "")
    )


def read_method_state(directory: Path, manifest: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A method's saved state: tensors from `method_state.safetensors`, the rest from the manifest."""
    record = manifest.get("method_state") or {}
    path = directory / METHOD_STATE
    if not path.is_file():
        if record:
            raise ILoRAError(f"{path}: missing (the method's saved state)")
        return {}, record
    return _load_tensors(path, "method state"), record


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ILoRAError(f"{path}: damaged {what} ({' '.join(str(err).split())})") from None


def planned_outputs(
    output_dir: str | None, args: ILoRAArguments, overwrite: bool, resume_from: str | None = None
) -> TaskOutputs:
    """Everything a task will write and read, checked before the model loads (see `ilora.paths`)."""
    if not output_dir:
        raise ILoRAError("--output_dir is required")
    output = Path(output_dir)
    check_directory_target(output, "output_dir")  # before anything looks inside it
    reads: dict[str, Path] = {}
    if args.previous_task_model:
        previous = Path(args.previous_task_model)
        manifest = read_manifest(previous)
        reads["previous_task_model"] = previous
        stable = previous_stable_path(previous, manifest, args.ema_adapter_path)
        if stable is not None:
            reads["previous stable adapter"] = stable
    if resume_from and resume_from not in RESUME_LATEST:
        reads["resume_from_checkpoint"] = Path(resume_from)
    stable = stable_save_path(output, args) if args.uses_stable and args.save_ema_adapter else None
    outputs = TaskOutputs(output, stable, reads, overwrite)
    outputs.check(is_finished(output))
    return outputs


def _resolve(directory: Path, stored: str | None) -> Path | None:
    if stored is None:
        return None
    path = Path(stored)
    return path if path.is_absolute() else directory / path


def stable_save_path(output_dir: Path, args: ILoRAArguments) -> Path:
    """ema_adapter_path names where the stable adapter is saved, except for a chained task, where it
    names the previous stable adapter: that one is never overwritten."""
    if args.ema_adapter_path and not args.previous_task_model:
        return Path(args.ema_adapter_path)
    return output_dir / STABLE


def buffer_path(root: Path, world_size: int | None = None, rank: int | None = None) -> Path:
    """`buffer/` in one process; `buffer/rank-<r>/` when every rank keeps its own reservoir."""
    world_size = distributed.world_size() if world_size is None else world_size
    rank = distributed.rank() if rank is None else rank
    return root if world_size == 1 else root / f"rank-{rank}"


def write_task(
    output_dir: str | Path,
    model: PeftModel,
    buffer: ReplayBuffer | None,
    args: ILoRAArguments,
    manifest: dict[str, Any],
    adapters: list[str],
    method_state: tuple[dict[str, torch.Tensor], dict] = ({}, {}),
) -> Path:
    """Write a finished task: the adapters named (as PEFT directories), buffers and the method's state
    via a staging directory, the manifest last.

    Called on every rank: each writes its own buffer, rank 0 the rest."""
    output_dir = Path(output_dir)
    staging = output_dir / STAGING
    if distributed.rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    if buffer is not None:
        buffer.save(buffer_path(staging / "buffer"))
    checksums = distributed.gather(AdapterPair(model).stable_checksum()) if args.uses_stable else None
    whole = sharding.full_adapter_state(model) if sharding.is_sharded(model) else None  # a collective: every rank
    buffers = distributed.gather(float(buffer.num_seen)) if buffer is not None else None
    distributed.barrier()
    if distributed.rank() == 0:
        try:
            targets = {
                name: stable_save_path(output_dir, args) if name == STABLE else output_dir / name for name in adapters
            }
            with writing(output_dir):  # a full disk: one line, exit 1; the staging folder is cleared on retry
                if method_state[0]:
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in method_state[0].items()},
                        str(staging / METHOD_STATE),
                    )
                _publish(output_dir, staging, model, targets, whole)
        except OSError as err:  # permissions and the like: say so in one line; nothing is marked finished
            raise ILoRAError(f"could not write the task to {output_dir}: {err}; it is not marked finished") from None
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "method": args.method,
            "ilora_args": asdict(args),
            "adapters": {name: _relative(path, output_dir) for name, path in targets.items()},
            "stable_path": _relative(targets.get(STABLE), output_dir),
            "method_state": method_state[1],
            "stable_checksum_per_rank": checksums,
            "buffer": None
            if buffer is None
            else {
                "size": len(buffer),
                "num_seen": buffer.num_seen,
                "ranks": distributed.world_size(),
                "num_seen_per_rank": [int(n) for n in buffers],
                "bytes_per_row": buffer.bytes_per_row(),
            },
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(output_dir / MANIFEST, manifest)
    distributed.barrier()  # nobody moves on before the task is finished
    return output_dir


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
    _replace(staging / "buffer", output_dir / "buffer", "buffer")
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


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# ------------------------------------------------------------- checkpoints
def is_complete_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that was completely written; half-written ones are ignored."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and is_complete_checkpoint(path):
            candidates.append((int(suffix), path))
    return max(candidates)[1] if candidates else None


def claim_checkpoint(folder: Path) -> None:
    """Mark `folder` as ilora's before the Trainer writes into it; refuse one that is someone else's
    (made while training ran: the start-up check has seen every earlier one)."""
    if folder.exists() and not is_ilora_checkpoint(folder):
        raise ILoRAError(
            f"{folder} appeared during training and was not written by ilora; "
            "ilora never touches it: move it, then resume"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHECKPOINT_CLAIM).touch()


def save_checkpoint_state(
    folder: Path,
    step: int,
    task_id: str | None,
    buffer: ReplayBuffer | None,
    method_state: tuple[dict[str, torch.Tensor], dict],
    task_loss: dict,
    identity: dict,
) -> None:
    """What ilora adds to a Trainer checkpoint: every rank's buffer, the method's state, and last the
    marker that says the checkpoint is complete."""
    if buffer is not None:  # every rank saves its own buffer
        buffer.save(buffer_path(folder / CHECKPOINT_BUFFER))
    distributed.barrier()
    if distributed.rank() == 0:
        if method_state[0]:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in method_state[0].items()}, str(folder / METHOD_STATE)
            )
        write_json(
            folder / CHECKPOINT_MARKER,
            {
                "ema_step": step,
                "task_id": task_id,
                "format_version": 1,
                "method_state": method_state[1],
                "task_loss": task_loss,
                **identity,
            },
        )


def sharded_adapters(folder: Path) -> Path:
    """A checkpoint's adapters written by ilora itself (a run under FSDP2 or DeepSpeed), checked to be there."""
    path = folder / SHARDED_ADAPTERS
    if not any((path / name).is_file() for name in (".metadata", sharding.PARTITIONED_ADAPTERS)):
        raise ILoRAError(
            f"{folder}: no {SHARDED_ADAPTERS} (written by a run that was not sharded); resume it the way it ran"
        )
    return path


def load_checkpoint_state(folder: Path, with_buffer: bool, identity: dict):
    """Check a checkpoint before the Trainer reads it; return (step, this rank's buffer, method state,
    the task's loss so far or None)."""
    if not is_complete_checkpoint(folder):
        raise ILoRAError(f"{folder}: not a complete ilora checkpoint (no {CHECKPOINT_MARKER})")
    state = read_json(folder / CHECKPOINT_MARKER, "checkpoint marker")
    if not isinstance(state, dict) or not isinstance(state.get("ema_step"), int):
        raise ILoRAError(f"{folder / CHECKPOINT_MARKER}: damaged checkpoint marker (no integer ema_step)")
    if isinstance(state.get("base_model"), dict) and isinstance(state["base_model"].get("fingerprint"), str):
        check_identity(state, folder, identity["base_model"], identity["lora"])  # (older checkpoints recorded none)
    for adapter in folder.iterdir():
        if (adapter / ADAPTER_CONFIG).is_file():
            check_adapter_dir(adapter)
    read_json(folder / "trainer_state.json", "trainer state")
    buffer = ReplayBuffer.load(buffer_path(folder / CHECKPOINT_BUFFER)) if with_buffer else None
    task_loss = state.get("task_loss")
    if task_loss is not None and not (
        isinstance(task_loss, dict)
        and isinstance(task_loss.get("micro_batches"), int)
        and isinstance(task_loss.get("sum"), (int, float))
    ):
        raise ILoRAError(f"{folder / CHECKPOINT_MARKER}: damaged checkpoint marker (task_loss {task_loss!r})")
    return state["ema_step"], buffer, read_method_state(folder, state), task_loss
