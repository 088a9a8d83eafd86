"""What a task was trained on, by content: the base weights' fingerprint, the tokenizer's digest and the
LoRA settings. Task manifests and checkpoint markers record them; every route that continues,
evaluates, exports or resumes a task compares them the same way, through `check_identity`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel

from ilora.core.adapters import adapter_parameters
from ilora.errors import ILoRAError

FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


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
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True).encode())
    adapters = {id(p) for p in adapter_parameters(base).values()}  # adapters are not the base model
    for name, tensor in base.named_parameters():
        if id(tensor) in adapters:
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
    base model and tokenizer at hand, `lora` the LoRA settings about to be used (None: not compared)."""
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
