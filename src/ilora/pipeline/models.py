"""Models as the commands need them: the base a task trains on, and a finished task opened whole (its
base, every adapter it saved, the method that trained it), checked to be the base it was trained on.
`ilora eval`, `ilora export` and a run's scoring of a sharded task all open tasks through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel

from ilora import methods
from ilora.config.arguments import ModelArguments
from ilora.core.adapters import check_adapter_dir, load_saved_adapters
from ilora.errors import ILoRAError
from ilora.runtime import precision
from ilora.runtime.loader import load_model_and_tokenizer, quantization_of
from ilora.store import taskdir
from ilora.store.identity import base_model_identity, check_identity


def lora_config(model_args: ModelArguments) -> LoraConfig:
    return LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        task_type="CAUSAL_LM",
    )


def load_base(model_args: ModelArguments, training_args):
    """The base model and tokenizer as the arguments ask: full precision, or quantized (QLoRA), its
    4-bit layers computing in the training precision."""
    compute = precision.autocast_dtype(training_args.bf16, training_args.fp16) or torch.float32
    return load_model_and_tokenizer(
        model_args.model_name_or_path,
        model_args.trust_remote_code,
        quantization=model_args.quantization,
        compute_dtype=compute,
    )


def on_device(model, device):
    """A model on `device`; a quantized one stays where bitsandbytes placed it (it cannot be moved)."""
    return model if quantization_of(model) else model.to(device)


@dataclass
class TaskModel:
    """A finished task opened whole."""

    model: PeftModel  # the base with every adapter the task saved, all frozen
    tokenizer: Any
    manifest: dict
    method: type  # the registered class of the method that trained it
    options: Any  # that method's options, as the task recorded them

    def reports(self) -> list[str]:
        """What this task's model can be evaluated as (the adapters each report sums are all here)."""
        evaluated = self.method.evaluated(self.model, self.options)
        return [r for r, names in evaluated.items() if all(n in self.model.peft_config for n in names)]


def open_task(
    task_dir: Path, model: str | None = None, trust_remote_code: bool = False, device: str | torch.device = "cpu"
) -> TaskModel:
    """A finished task's base (`model`, or the one it recorded) with every adapter it saved, loaded as
    it was trained (quantized, its 4-bit layers computing in its precision) and checked: the adapters
    fit, the base and tokenizer are the ones it was trained on."""
    manifest = taskdir.read_manifest(task_dir)
    method = methods.get(manifest["method"])
    saved = taskdir.saved_adapters(task_dir, manifest)
    for path in saved.values():
        check_adapter_dir(path, manifest["lora"])
    trained = manifest.get("hardware", {}).get("precision")
    compute = precision.autocast_dtype(trained == "bf16", trained == "fp16") or torch.float32
    base, tokenizer = load_model_and_tokenizer(
        model or manifest["base_model"]["name_or_path"],
        trust_remote_code,
        quantization=manifest.get("quantization"),
        compute_dtype=compute,
    )
    check_identity(manifest, task_dir, base_model_identity(base, tokenizer))
    peft_model = on_device(load_saved_adapters(base, saved), device)
    return TaskModel(peft_model, tokenizer, manifest, method, recorded_options(method, manifest))


def recorded_options(method_cls, manifest: dict):
    """The method's options as a task recorded them (its class rebuilt, so they are checked again)."""
    record = manifest.get("method_options")
    if method_cls.Arguments is None or record is None:
        return None
    try:
        return method_cls.Arguments(**record)
    except TypeError as err:
        raise ILoRAError(f"{taskdir.MANIFEST}: damaged method_options ({err})") from None
