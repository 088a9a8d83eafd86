"""Which parallel set-ups ilora trains, decided in one place and before anything loads.

DDP: every rank holds whole adapters; DDP keeps the plastic ones equal, so the EMA is the same on every
rank. FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3 shard them: the EMA runs on each rank's local part
(see runtime.sharding). DeepSpeed ZeRO-0/1/2 hold whole parameters, so the EMA, the stable pass and
saving are those of DDP.

Precision under DeepSpeed: its bf16 mode casts the whole module, stable adapter included, to bf16,
where an EMA step (a few percent of a small difference) is lost to rounding. Under ZeRO-0/1/2 ilora
puts the stable adapter back in fp32 once the engine is up (core.adapters.AdapterPair.stable_in_fp32);
ZeRO-3's partitions cannot be, so it trains in fp32. fp16 (loss scaling, skipped steps) is refused.
`bf16: auto` means fp32 under DeepSpeed: bf16 there is asked for explicitly.

Refused in one line: FSDP1 (it flattens parameters), a quantized base under FSDP2 or ZeRO-3, the
methods whose terms need whole parameters outside the forward under ZeRO-3 (`uses_whole_parameters`),
the methods that evaluate the base weights plus dense changes under FSDP2 or ZeRO-3 (`merges_into_base`),
parameter offload to NVMe, and DeepSpeed without a launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ilora.errors import ILoRAError
from ilora.files import read_json

DEEPSPEED_HALF = (
    "DeepSpeed's {mode} mode casts the whole model to 16 bits, the stable adapter too, and the EMA's "
    "small steps are lost to rounding: {remedy}"
)
DEEPSPEED_FP16 = "train DeepSpeed in fp32, or in bf16 (bf16: true) under ZeRO-0/1/2"
DEEPSPEED_ZERO3_BF16 = (
    "ZeRO-3 keeps only partitions, which ilora cannot hold in fp32: train ZeRO-3 in fp32, or bf16 under ZeRO-2 or FSDP2"
)


# ------------------------------------------------------------------ DeepSpeed
def check_deepspeed_request(argv: list[str]) -> None:
    """DeepSpeed asked for by `--deepspeed FILE_OR_JSON` or by `accelerate launch --use_deepspeed` (its
    environment), checked before the Trainer's arguments import deepspeed and read the file."""
    if accelerate_deepspeed():
        _check_accelerate_deepspeed()
    values = [
        a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
        for i, a in enumerate(argv)
        if a.split("=")[0] == "--deepspeed"
    ]
    if not values:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ILoRAError("--deepspeed needs the deepspeed package: pip install 'ilora[deepspeed]'")
    value = values[-1]
    if value.lstrip().startswith("{"):
        config = _json_value(value, "--deepspeed")
    elif Path(value).is_file():
        config = read_json(Path(value), "DeepSpeed config")
    else:
        raise ILoRAError(f"--deepspeed {value}: no such file")
    check_deepspeed(config, f"--deepspeed {value}")
    if "LOCAL_RANK" not in os.environ:  # DeepSpeed would look for MPI and fail with a traceback
        raise ILoRAError(
            "--deepspeed runs under a launcher that starts its processes: torchrun --nproc_per_node N, "
            "accelerate launch or deepspeed"
        )


def accelerate_deepspeed() -> bool:
    """Launched by `accelerate launch --use_deepspeed`, which says so through the environment."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _check_accelerate_deepspeed() -> None:
    """`accelerate launch --use_deepspeed [--zero_stage N] [--deepspeed_config_file F] [--mixed_precision M]`
    passes its settings through the environment (accelerate/utils/launch.py)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        check_deepspeed(read_json(Path(path), "DeepSpeed config"), path)
    mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mode in ("bf16", "fp16"):
        raise ILoRAError(
            f"accelerate launch --mixed_precision {mode} with DeepSpeed: ilora trains Accelerate-launched "
            "DeepSpeed in fp32; for bf16 under ZeRO-0/1/2 set deepspeed: CONFIG and bf16: true in its config"
        )


def zero3_requested(training_args) -> bool:
    """DeepSpeed ZeRO-3 asked for by the Trainer's `deepspeed` setting or by `accelerate launch` (its
    environment: a stage, or a config file)."""
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.is_zero3()
    if not accelerate_deepspeed():
        return False
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        return (read_json(Path(path), "DeepSpeed config").get("zero_optimization") or {}).get("stage") == 3
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def check_deepspeed(config: Any, where: str, as_written: bool = True) -> None:
    """Any ZeRO stage, in fp32 or (ZeRO-0/1/2) bf16: one line for anything else. `as_written`: the user's
    file (the Trainer fills `auto` values with its own settings: bf16.enabled true then follows ilora's bf16)."""
    if not isinstance(config, dict):
        raise ILoRAError(f"{where}: not a JSON object")
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ILoRAError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3")
    if isinstance(config.get("fp16"), dict) and config["fp16"].get("enabled") is True:
        raise ILoRAError(f"{where}: " + DEEPSPEED_HALF.format(mode="fp16", remedy=DEEPSPEED_FP16))
    if as_written and isinstance(config.get("bf16"), dict) and config["bf16"].get("enabled") is True:
        raise ILoRAError(
            f"{where}: bf16.enabled true: leave it at auto and set ilora's bf16: true (ZeRO-0/1/2), which "
            "keeps the stable adapter in fp32"
        )
    offload = zero.get("offload_param") or {}
    if isinstance(offload, dict) and offload.get("device") == "nvme":
        raise ILoRAError(
            f"{where}: offload_param to nvme swaps the adapters' partitions out of memory, where ilora's "
            "EMA updates the stable one after every step: offload parameters to cpu, or not at all"
        )


def deepspeed_precision(requested: dict[str, bool | str], training_args) -> dict[str, bool]:
    """What bf16/fp16 (`auto`, True or False each) mean under DeepSpeed: auto is fp32; bf16 only when asked
    for, with a config file, under ZeRO-0/1/2; fp16 never."""
    if requested["fp16"] is True:
        raise ILoRAError("--fp16 true with --deepspeed: " + DEEPSPEED_HALF.format(mode="fp16", remedy=DEEPSPEED_FP16))
    if requested["bf16"] is True and not training_args.deepspeed:
        raise ILoRAError(
            "--bf16 true with accelerate launch --use_deepspeed: ilora trains Accelerate-launched DeepSpeed "
            "in fp32; for bf16 under ZeRO-0/1/2 set deepspeed: CONFIG"
        )
    if requested["bf16"] is True and zero3_requested(training_args):
        raise ILoRAError(
            "--bf16 true with DeepSpeed ZeRO-3: " + DEEPSPEED_HALF.format(mode="bf16", remedy=DEEPSPEED_ZERO3_BF16)
        )
    return {"bf16": requested["bf16"] is True, "fp16": False}


def check_zero3(method_cls, quantized: bool, bf16: bool = False) -> None:
    """One line for what ilora cannot train under DeepSpeed ZeRO-3."""
    if bf16:
        raise ILoRAError(
            "bf16 with DeepSpeed ZeRO-3: " + DEEPSPEED_HALF.format(mode="bf16", remedy=DEEPSPEED_ZERO3_BF16)
        )
    check_whole_base(method_cls, "DeepSpeed ZeRO-3")
    if method_cls.uses_whole_parameters:
        raise ILoRAError(
            f"method {method_cls.name} under DeepSpeed ZeRO-3: it computes on whole adapter matrices outside "
            "the forward (a penalty, a designed projection), and ZeRO-3 keeps only partitions of them there; use ZeRO-2, "
            "FSDP2 (fsdp: full_shard, fsdp_config: {version: 2}) or DDP"
        )
    if quantized:
        raise ILoRAError(
            "a quantized base (quantization_bit) does not run under DeepSpeed ZeRO-3 in ilora; use one process or DDP"
        )


def check_whole_base(method_cls, engine: str) -> None:
    """One line for a method whose evaluated model adds dense changes to the base weights, under an
    engine that holds them in slices."""
    if method_cls.merges_into_base:
        raise ILoRAError(
            f"method {method_cls.name} under {engine}: its evaluated model adds dense weight changes to the "
            "whole base weights, which are sharded there; use DDP or DeepSpeed ZeRO-2"
        )


def _json_value(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ILoRAError(f"{what}: not valid JSON ({err.msg} at character {err.pos})") from None


# ----------------------------------------------------------------------- FSDP
def requested_fsdp(args) -> tuple[int, str] | None:
    """(FSDP version, checkpoint state dict type) the Trainer's own FSDP settings ask for, if any."""
    if args.fsdp_plugin_args is None:
        return None
    return args.fsdp_plugin_args["fsdp_version"], (args.fsdp_config or {}).get("state_dict_type", "SHARDED_STATE_DICT")


def check_fsdp(version: int, state_dict_type: str, quantized: bool, method_cls) -> None:
    """One line for an FSDP setting ilora cannot train with."""
    if version != 2:
        raise ILoRAError(
            "FSDP1 flattens parameters, so the stable adapter cannot be paired with the plastic one: "
            "set fsdp_config: {version: 2}"
        )
    if quantized:
        raise ILoRAError(
            "a quantized base (quantization_bit) does not run under FSDP2 in ilora; use one process or DDP"
        )
    if state_dict_type != "SHARDED_STATE_DICT":
        raise ILoRAError(
            f"fsdp state_dict_type {state_dict_type}: ilora checkpoints FSDP2 runs as SHARDED_STATE_DICT, "
            "its default (every rank writes its slices; task outputs are still whole PEFT adapters)"
        )
    check_whole_base(method_cls, "FSDP2")


# --------------------------------------------------------------- both, at once
def check_sharding(training_args, quantized: bool, method_cls) -> None:
    """FSDP and ZeRO-3 settings ilora cannot train with, refused before anything is read or written."""
    if zero3_requested(training_args):
        check_zero3(method_cls, quantized)
    requested = requested_fsdp(training_args)
    if requested is None:
        return
    check_fsdp(*requested, quantized, method_cls)
    if training_args.world_size < 2:
        raise ILoRAError(
            "fsdp shards over several processes: launch with torchrun --nproc_per_node N (or accelerate launch)"
        )


def check_engine(deepspeed_plugin, fsdp_plugin, method_cls, quantized: bool, bf16: bool) -> None:
    """The engine the Trainer actually set up (None: not that one). An Accelerate-launched config has not
    been through ilora's flags: the same rules, checked again on what runs."""
    if deepspeed_plugin is not None:
        check_deepspeed(deepspeed_plugin.deepspeed_config, "the DeepSpeed config", as_written=False)
        if deepspeed_plugin.zero_stage == 3:
            check_zero3(method_cls, quantized, bf16)
    if fsdp_plugin is not None:
        check_fsdp(fsdp_plugin.fsdp_version, fsdp_plugin.state_dict_type.name, quantized, method_cls)
