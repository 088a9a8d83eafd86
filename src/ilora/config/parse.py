"""Flags and config files into `Settings`, through one parser: a config's keys become the flags that set
them, so a key in YAML and a flag behave alike. transformers' `HfArgumentParser` builds the flags from
the argument dataclasses (ilora's, every method's own, the Trainer's); ilora adds `--bf16/--fp16 auto`,
the DeepSpeed and precision policy, `key=value` overrides, and one-line errors (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from ilora.config.arguments import ContinualArguments, DataArguments, ModelArguments, RunArguments, TaskSpec
from ilora.config.checks import check_training_arguments
from ilora.config.load import config_mapping, is_config_path, load_config, parse_overrides, resolve_path, to_argv
from ilora.errors import ILoRAError, did_you_mean
from ilora.runtime import policy, precision

TRAIN_ARGUMENTS = (ModelArguments, DataArguments, ContinualArguments, TrainingArguments)
ALIASES = {"model": "model_name_or_path"}
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


@dataclass
class Settings:
    """Everything one command was given: the argument groups, every registered method's options (their
    defaults where not given), the keys the user set (by flag, config or override), and for `ilora run`
    the sequence."""

    model: ModelArguments
    data: DataArguments
    continual: ContinualArguments
    training: TrainingArguments
    options: dict[str, Any]
    given: frozenset[str] = frozenset()
    run: RunArguments | None = None

    @property
    def method(self) -> str:
        return self.continual.method

    @property
    def method_options(self) -> Any:
        """The chosen method's own options (None for a method that has none)."""
        return self.options.get(self.method)

    def foreign_options(self) -> dict[str, list[str]]:
        """Options the user set that belong to another method than the chosen one: {method: [keys]}."""
        foreign = {}
        for name, options in self.options.items():
            keys = [f.name for f in fields(options)] if name != self.method else []
            given = [key for key in keys if key in self.given]
            if given:
                foreign[name] = given
        return foreign


# ------------------------------------------------------------ the two entries
def parse_train_args(argv: list[str], method_classes: dict[str, type | None] | None = None) -> Settings:
    """`ilora train`: flags; or a config file, then `key=value` overrides, then flags (each wins over
    what comes before it). `method_classes`: every registered method's options class (None: it has none;
    `ilora.methods.argument_classes()`)."""
    method_classes = method_classes or {}
    classes = _classes(method_classes)
    if argv and is_config_path(argv[0]):
        path = Path(argv[0])
        overrides, flags = _leading_overrides(argv[1:])
        mapping = config_mapping(_checked_keys(load_config(path), classes, path), path)
        mapping.update(_checked_keys(parse_overrides(overrides), classes, "the command line"))
        argv = to_argv(mapping) + flags
    parsed = parse_argv(argv, classes, "ilora train", list(method_classes))
    return _settings(parsed, method_classes, argv)


def parse_run_config(
    path: Path, overrides: dict[str, Any] | None = None, method_classes: dict[str, type | None] | None = None
) -> Settings:
    """`ilora run`: a run config (the train keys, plus `tasks` or `benchmark`, and evaluation settings)
    with `overrides` from the command line applied over it."""
    overrides, method_classes = overrides or {}, method_classes or {}
    classes = _classes(method_classes) + (RunArguments,)
    mapping = config_mapping(_checked_keys(load_config(path), classes, path, BENCHMARK_KEYS), path)
    mapping.update(_checked_keys(overrides, classes, "the command line", BENCHMARK_KEYS))
    _refuse_per_task_keys(mapping, path)
    tasks = _benchmark_tasks(mapping, path) if "benchmark" in mapping else mapping.pop("tasks", None)
    if not isinstance(tasks, list):
        raise ILoRAError(f"{path}: 'tasks' must be a list of tasks (name, train, test, scoring, choices)")
    run_keys = {f.name for f in fields(RunArguments)} - {"tasks"}
    specs = [task_spec(entry, path, i) for i, entry in enumerate(tasks, start=1)]
    run = RunArguments(tasks=specs, **{k: mapping.pop(k) for k in list(mapping) if k in run_keys})
    mapping.setdefault("output_dir", str(path.parent / "runs" / "ilora"))
    argv = to_argv(mapping)
    parsed = parse_argv(argv, classes[:-1], "ilora run", list(method_classes))
    return dataclasses.replace(_settings(parsed, method_classes, argv), run=run)


# ---------------------------------------------------------------- the parser
PRECISION_FLAGS = ("--bf16", "--fp16")
PRECISION_HELP = {
    "--bf16": "auto (default), true or false. auto: bf16 where the device computes it natively (CUDA with bf16; "
    "a CPU with AMX or AVX512-BF16), else fp16 on CUDA, else fp32.",
    "--fp16": "auto (default), true or false. auto: fp16 on a CUDA GPU without bf16.",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except bf16/fp16: the Trainer's default (False) is not ilora's (auto)."""

    def _get_help_string(self, action):
        if set(action.option_strings) & set(PRECISION_FLAGS):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(HfArgumentParser):
    """argparse errors become ILoRAError: one line, exit code 2, like every other bad input. `methods`:
    the registered names, listed in `--method`'s help."""

    def __init__(self, *args, methods: list[str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        for action in self._actions:
            for flag in set(action.option_strings) & set(PRECISION_FLAGS):  # what ilora does with bf16/fp16
                action.help = PRECISION_HELP[flag]
            if methods and "--method" in action.option_strings:
                action.help = f"{action.help.rstrip('.')}: {', '.join(methods)}."

    def error(self, message: str):
        raise ILoRAError(message)


def parse_argv(argv: list[str], classes: tuple[type, ...], prog: str, methods: list[str] | None = None) -> tuple:
    """The dataclasses `classes` filled from `argv`, precision resolved, the Trainer's values checked."""
    policy.check_deepspeed_request(argv)  # before the Trainer's arguments import deepspeed and read the file
    argv, precision_flags = _take_precision_flags(argv)
    parser = ArgumentParser(classes, prog=prog, methods=methods)
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
    if args.deepspeed or policy.accelerate_deepspeed():  # DeepSpeed casts the model to its half precision
        requested = policy.deepspeed_precision(requested, args)
    bf16, fp16 = precision.choose(requested["bf16"], requested["fp16"], hardware)
    if (bf16, fp16) == (args.bf16, args.fp16):
        return args
    # the Trainer wants use_cpu for bf16 on a CPU; without CUDA the run is on the CPU anyway
    use_cpu = args.use_cpu or (bf16 and hardware.device == "cpu")
    try:
        return dataclasses.replace(args, bf16=bf16, fp16=fp16, use_cpu=use_cpu)
    except ValueError as err:  # e.g. fp16 on a device without it: the Trainer's own one-line reason
        raise ILoRAError(str(err).strip().splitlines()[0]) from None


# ------------------------------------------------------------------- pieces
def _classes(method_classes: dict[str, type | None]) -> tuple[type, ...]:
    return TRAIN_ARGUMENTS + tuple(cls for cls in method_classes.values() if cls is not None)


def _settings(parsed: tuple, method_classes: dict[str, type | None], argv: list[str]) -> Settings:
    model, data, continual, training, *options = parsed
    names = [name for name, cls in method_classes.items() if cls is not None]
    given = _given_keys(argv)
    # EasyCL's `use_ilora: false` turns the default method into seq_lora (ContinualArguments); naming
    # ilora as well contradicts it
    if not continual.use_ilora and _given_value(argv, "method") == "ilora":
        raise ILoRAError("use_ilora=false contradicts method=ilora: set one of them")
    return Settings(model, data, continual, training, dict(zip(names, options)), given)


def _given_keys(argv: list[str]) -> frozenset[str]:
    """The keys `argv` sets (a config's keys and overrides have become flags by now)."""
    keys = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--") and len(token) > 2}
    return frozenset(ALIASES.get(key, key) for key in keys)


def _given_value(argv: list[str], key: str) -> str | None:
    """The last value `argv` gives `--key` (None: not given)."""
    value = None
    for i, token in enumerate(argv):
        name, sep, inline = token.partition("=")
        if name == f"--{key}":
            value = inline if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _leading_overrides(arguments: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` arguments right after the config file, and the flags after them."""
    first_flag = next((i for i, a in enumerate(arguments) if a.startswith("-")), len(arguments))
    return arguments[:first_flag], arguments[first_flag:]


def _checked_keys(mapping: dict, classes: tuple[type, ...], where: Path | str, more: tuple[str, ...] = ()) -> dict:
    known = {f.name for cls in classes for f in fields(cls)} | set(ALIASES) | set(more)
    for key in mapping:
        if key not in known:
            raise ILoRAError(f"{where}: unknown key '{key}'{did_you_mean(str(key), known)}")
    return mapping


def _refuse_per_task_keys(mapping: dict, path: Path) -> None:
    ignored = [key for key in RUN_SETS_ITSELF if key in mapping]
    if ignored:
        raise ILoRAError(
            f"{path}: '{ignored[0]}' is a setting of one `ilora train`; a run sets it for each task "
            "itself (the data: each task's train and test; the chain: the order of tasks)"
        )
    output_dir = mapping.get("output_dir", "unset")
    if output_dir is None or output_dir == "" or not isinstance(output_dir, str):
        raise ILoRAError(
            f"{path}: output_dir is {output_dir!r}: name a directory, or leave the key out "
            f"(then {path.parent / 'runs'})"
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
    """One entry of a run config's `tasks`, its paths read from the config's directory."""
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
