"""`ilora` command line. Bad input is one line on stderr and exit code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config import DataArguments, ILoRAArguments, ModelArguments
from .errors import ILoRAError

USAGE = """usage: ilora COMMAND [ARGS]

commands:
  train   train one task (flags or a YAML file; `ilora train --help` lists every flag)

add --debug to any command for full tracebacks."""


class _Parser(HfArgumentParser):
    """argparse errors become ILoRAError: one line, exit code 2, like every other bad input."""

    def error(self, message: str):
        raise ILoRAError(message)


TRAIN_ARGUMENTS = (ModelArguments, DataArguments, ILoRAArguments, TrainingArguments)


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ILoRAArguments, TrainingArguments]:
    parser = _Parser(TRAIN_ARGUMENTS, prog="ilora train")
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_argv(Path(argv[0]), TRAIN_ARGUMENTS) + argv[1:]
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


def yaml_to_argv(path: Path, dataclasses: tuple[type, ...]) -> list[str]:
    """LLaMA-Factory style: a YAML mapping of flag names to values. Unknown keys are an error."""
    mapping = load_yaml_mapping(path)
    known = {f.name for cls in dataclasses for f in fields(cls)} | {"model"}
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ILoRAError(f"{path}: unknown key '{key}'{hint}")
    return to_argv(mapping)


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


def command_train(argv: list[str]) -> None:
    from .workflow import train_task  # heavy imports only when training

    output_dir = train_task(*parse_train_args(argv))
    print(f"ilora: task written to {output_dir}")


COMMANDS: dict[str, Callable[[list[str]], None]] = {"train": command_train}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"ilora: error: unknown command '{command}'{hint}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[command](rest)
    except ILoRAError as err:
        if debug:
            raise
        print(f"ilora {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
