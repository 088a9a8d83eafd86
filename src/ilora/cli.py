"""`ilora` command line. Bad input is one line on stderr and exit code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .config import parse_run_config, parse_train_args
from .errors import ILoRAError

USAGE = """usage: ilora COMMAND [ARGS]

commands:
  train     train one task (flags or a YAML file; `ilora train --help` lists every flag)
  run       train and evaluate a task sequence: ilora run CONFIG.yaml [--method ilora|er|seq_lora|joint]
  eval      score adapters on a config's tasks: ilora eval --model M --adapter DIR --tasks CONFIG.yaml
  compare   one table and plot for several runs: ilora compare RUN_DIR... [--out DIR]
  demo      the offline benchmark on SmolLM2-135M and real text: ilora demo [--full]

add --debug to any command for full tracebacks."""


def command_train(argv: list[str]) -> None:
    from .workflow import train_task  # heavy imports only when training

    output_dir = train_task(*parse_train_args(argv))
    print(f"ilora: task written to {output_dir}")


def command_run(argv: list[str]) -> None:
    from .workflow import run_sequence

    parser = _simple_parser("ilora run", "train and evaluate a task sequence")
    parser.add_argument("config", type=Path, help="run config (YAML)")
    parser.add_argument("--method", help="override the config's method: ilora, er, seq_lora or joint")
    parser.add_argument("--output_dir", help="override the config's output_dir")
    opts = parser.parse_args(argv)
    overrides = {k: v for k, v in (("method", opts.method), ("output_dir", opts.output_dir)) if v}
    run_dir = run_sequence(*parse_run_config(opts.config, overrides))
    print(f"ilora: run written to {run_dir} (report.md, metrics.json)")


def command_eval(argv: list[str]) -> None:
    from .workflow import evaluate_adapters

    parser = _simple_parser("ilora eval", "score a trained adapter (or a task directory) on a config's tasks")
    parser.add_argument("--model", required=True, help="base model directory or 'smollm2'")
    parser.add_argument("--adapter", required=True, type=Path, help="PEFT adapter directory or ilora task directory")
    parser.add_argument("--tasks", required=True, type=Path, help="run config whose tasks are scored")
    opts = parser.parse_args(argv)
    scores = evaluate_adapters(opts.model, opts.adapter, opts.tasks)
    print(json.dumps(scores, indent=2))


def command_compare(argv: list[str]) -> None:
    from .report import compare

    parser = _simple_parser("ilora compare", "put several runs in one table and one plot")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (<output_dir>/<method>)")
    parser.add_argument("--out", type=Path, help="where compare.md and compare.png go (default: parent of the first)")
    opts = parser.parse_args(argv)
    print(compare(opts.runs, opts.out or opts.runs[0].parent))


def command_demo(argv: list[str]) -> None:
    from .workflow import run_demo

    parser = _simple_parser("ilora demo", "offline continual-learning benchmark on SmolLM2-135M-Instruct")
    parser.add_argument("--full", action="store_true", help="the full benchmark: 4 tasks, 4 methods, 3 seeds")
    parser.add_argument("--output_dir", type=Path, help="default runs/demo (runs/full with --full)")
    opts = parser.parse_args(argv)
    print(run_demo(opts.full, opts.output_dir))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ILoRAError(message)  # one line, exit code 2, like every other bad input


def _simple_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": command_train,
    "run": command_run,
    "eval": command_eval,
    "compare": command_compare,
    "demo": command_demo,
}


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
        print(f"ilora: error: unknown command '{command}'{hint}; `ilora --help` lists the commands", file=sys.stderr)
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
