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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel

from . import distributed
from .adapters import PLASTIC, STABLE, AdapterPair, save_adapter
from .buffer import ReplayBuffer
from .config import ILoRAArguments
from .errors import ILoRAError

MANIFEST = "ilora_task.json"
CHECKPOINT_MARKER = "ilora_checkpoint.json"  # written last into a Trainer checkpoint: it is complete
FORMAT_VERSION = 1


def is_finished(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ILoRAError(f"previous_task_model {directory}: no such directory")
    if not is_finished(directory):
        raise ILoRAError(f"previous_task_model {directory}: not a finished ilora task (no {MANIFEST})")
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{directory / MANIFEST}: unreadable manifest ({err})") from None


def lora_identity(config: LoraConfig) -> dict[str, Any]:
    """The LoRA settings a chained task must share with its predecessor."""
    targets = config.target_modules
    if not isinstance(targets, str):
        targets = sorted(targets)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": targets, "use_dora": config.use_dora}


def base_model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Name and a fingerprint of the base weights (config + a slice of the input embeddings)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = base.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    embedding = base.get_input_embeddings().weight.detach()
    digest.update(embedding[:8].float().cpu().numpy().tobytes())
    return {"name_or_path": config.get("_name_or_path", ""), "fingerprint": digest.hexdigest()[:16]}


def check_compatible(manifest: dict, directory: Path, lora: dict, base: dict, prev_task_id: str | None) -> None:
    if prev_task_id is not None and manifest.get("task_id") != prev_task_id:
        raise ILoRAError(
            f"prev_task_id={prev_task_id!r} but {directory} holds task {manifest.get('task_id')!r}"
        )
    if manifest["lora"] != lora:
        raise ILoRAError(f"LoRA config {lora} does not match the previous task's {manifest['lora']} ({directory})")
    if manifest["base_model"]["fingerprint"] != base["fingerprint"]:
        raise ILoRAError(
            f"base model {base['name_or_path']!r} differs from the previous task's "
            f"{manifest['base_model']['name_or_path']!r} ({directory})"
        )


def previous_paths(directory: Path, manifest: dict, ema_adapter_path: str | None) -> tuple[Path, Path | None]:
    plastic = directory / PLASTIC
    stable = Path(ema_adapter_path) if ema_adapter_path else _resolve(directory, manifest.get("stable_path"))
    for path in (plastic, stable):
        if path is not None and not (path / "adapter_config.json").is_file():
            raise ILoRAError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    return plastic, stable


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
) -> Path:
    """Write a finished task: adapters and buffers via a staging directory, the manifest last.

    Called on every rank: each writes its own buffer, rank 0 the rest."""
    output_dir = Path(output_dir)
    staging = output_dir / ".staging"
    if distributed.rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    if buffer is not None:
        buffer.save(buffer_path(staging / "buffer"))
    checksums = distributed.gather(AdapterPair(model).stable_checksum()) if args.uses_stable else None
    buffers = distributed.gather(float(buffer.num_seen)) if buffer is not None else None
    distributed.barrier()
    if distributed.rank() == 0:
        try:
            stable_path = _publish(output_dir, staging, model, args)
        except OSError as err:  # disk full, permissions: say so in one line; nothing is marked finished
            raise ILoRAError(f"could not write the task to {output_dir}: {err}; it is not marked finished") from None
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "ilora_args": asdict(args),
            "stable_path": _relative(stable_path, output_dir),
            "stable_checksum_per_rank": checksums,
            "buffer": None
            if buffer is None
            else {"size": len(buffer), "num_seen": buffer.num_seen, "ranks": distributed.world_size(),
                  "num_seen_per_rank": [int(n) for n in buffers]},  # fmt: skip
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomically(output_dir / MANIFEST, manifest)
    distributed.barrier()  # nobody moves on before the task is finished
    return output_dir


def _publish(output_dir: Path, staging: Path, model: PeftModel, args: ILoRAArguments) -> Path | None:
    """Adapters into the staging directory, then everything renamed into place. An earlier manifest
    (with --overwrite_output_dir) goes first, so a crash half-way leaves a task that is not finished."""
    save_adapter(model, PLASTIC, staging / PLASTIC)
    (output_dir / MANIFEST).unlink(missing_ok=True)
    stable_path = None
    if args.uses_stable and args.save_ema_adapter:
        save_adapter(model, STABLE, staging / STABLE)
        stable_path = stable_save_path(output_dir, args)
    for name in (PLASTIC, "buffer"):
        _replace(staging / name, output_dir / name)
    if stable_path is not None:
        _replace(staging / STABLE, stable_path)
    shutil.rmtree(staging)
    return stable_path


def _replace(source: Path, target: Path) -> None:
    if not source.exists():
        return
    if target.exists():
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


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
