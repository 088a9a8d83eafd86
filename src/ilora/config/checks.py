"""Value checks shared by every argument class (ilora's, the methods', the Trainer's): one line naming
the setting and the rule it breaks. A float must also be finite: NaN and inf are never settings."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ilora.errors import ILoRAError, did_you_mean

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_TASK_ID = 100  # a task id is part of directory names, which most file systems cap at 255 bytes
YAML_QUOTING = " (YAML reads unquoted 2020, yes, no, on, off as numbers or booleans: quote them, '2020')"


def check_value(name: str, value: Any, valid: Callable[[Any], bool], rule: str) -> None:
    """`name=value rule` unless `valid(value)`."""
    if isinstance(value, float) and not math.isfinite(value) or not valid(value):
        raise ILoRAError(f"{name}={value} {rule}")


def at_least(bound: float) -> Callable[[Any], bool]:
    return lambda v: v >= bound


def above(bound: float) -> Callable[[Any], bool]:
    return lambda v: v > bound


def in_unit_interval(v: float) -> bool:
    return 0.0 <= v < 1.0


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """`value` is one of `allowed`, with a suggestion when it is not."""
    if value not in allowed:
        raise ILoRAError(f"{name}={value!r} is not one of {allowed}{did_you_mean(str(value), allowed)}")


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


def check_training_arguments(args) -> None:
    """The Trainer's `TrainingArguments`: it accepts NaN, negative and zero-work settings and fails late
    or trains nothing."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ILoRAError(f"{f.name}={value} must be a finite number")
    check_value("learning_rate", args.learning_rate, at_least(0), "must be >= 0")
    check_value("per_device_train_batch_size", args.per_device_train_batch_size, at_least(1), "must be >= 1")
    check_value("gradient_accumulation_steps", args.gradient_accumulation_steps, at_least(1), "must be >= 1")
    check_value("num_train_epochs", args.num_train_epochs, at_least(0), "must be >= 0")
    _check_steps(args)
    for name in ("max_grad_norm", "weight_decay", "adam_epsilon", "warmup_steps"):
        check_value(name, getattr(args, name), at_least(0), "must be >= 0")
    for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        check_value(name, getattr(args, name), in_unit_interval, "must be in [0, 1)")
    for name in ("logging_steps", "save_steps"):
        check_value(name, getattr(args, name), above(0), "must be > 0")
    check_value("per_device_eval_batch_size", args.per_device_eval_batch_size, at_least(1), "must be >= 1")
    check_value("dataloader_num_workers", args.dataloader_num_workers, at_least(0), "must be >= 0")
    if args.save_total_limit is not None:
        rule = "must be >= 1 (or unset: keep every checkpoint)"
        check_value("save_total_limit", args.save_total_limit, at_least(1), rule)
    for name in ("seed", "data_seed"):
        if getattr(args, name) is not None:
            check_value(name, getattr(args, name), lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
    _check_reporting(args.report_to)


def _check_steps(args) -> None:
    """Training that takes no step, or a max_steps the Trainer would silently ignore."""
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
