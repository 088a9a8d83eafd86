"""`ilora` command line. Every refusal is one line on stderr (`--debug` shows the traceback).

Exit codes: 0 done; 2 bad input (nothing of the user's touched); 1 training diverged (a non-finite
loss, adapter or score: nothing marked finished); 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ilora.config.parse import ArgumentParser, parse_train_args
from ilora.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_WRITE_FAILED, ILoRAError, did_you_mean, is_refused_write

USAGE = """usage: ilora COMMAND [ARGS]

commands:
  train     train one task (flags or a YAML file; `ilora train --help` lists every flag)
  run       train and evaluate a task sequence: ilora run CONFIG.yaml [--method ilora|er|seq_lora|joint|ewc|lwf|derpp|olora]
  eval      score adapters on a config's tasks: ilora eval --model M --adapter DIR --tasks CONFIG.yaml
  compare   one table and plot for several runs: ilora compare RUN_DIR... [--out DIR]
  export    a merged model or a clean PEFT adapter: ilora export TASK_OR_RUN_DIR --output DIR [--merge]
  demo      the offline benchmark on SmolLM2-135M and real text: ilora demo [--full]

add --debug to any command for full tracebacks."""


def command_train(argv: list[str]) -> None:
    from ilora import methods
    from ilora.pipeline.workflow import train_task  # heavy imports only when training

    output_dir = train_task(*parse_train_args(argv, methods.argument_classes()))
    print(f"ilora: task written to {output_dir}")


def command_run(argv: list[str]) -> None:
    from ilora.pipeline.workflow import load_run_config, run_sequence

    parser = _simple_parser("ilora run", "train and evaluate a task sequence")
    parser.add_argument("config", type=Path, help="run config (YAML)")
    parser.add_argument("--method", help="override the config's method (a name in ilora.methods)")
    parser.add_argument("--output_dir", help="override the config's output_dir")
    opts = parser.parse_args(argv)
    overrides = {k: v for k, v in (("method", opts.method), ("output_dir", opts.output_dir)) if v}
    run_dir = run_sequence(*load_run_config(opts.config, overrides))
    print(f"ilora: run written to {run_dir} (report.md, metrics.json)")


def command_eval(argv: list[str]) -> None:
    from ilora.pipeline.workflow import evaluate_adapters

    parser = _simple_parser("ilora eval", "score a trained adapter (or a task directory) on a config's tasks")
    parser.add_argument("--model", required=True, help="base model directory or 'smollm2'")
    parser.add_argument("--adapter", required=True, type=Path, help="PEFT adapter directory or ilora task directory")
    parser.add_argument("--tasks", required=True, type=Path, help="run config whose tasks are scored")
    opts = parser.parse_args(argv)
    scores = evaluate_adapters(opts.model, opts.adapter, opts.tasks)
    print(json.dumps(scores, indent=2))


def command_export(argv: list[str]) -> None:
    from ilora.pipeline.export import export

    parser = _simple_parser("ilora export", "a task's or a run's adapter as a merged model or a clean PEFT adapter")
    parser.add_argument("source", type=Path, help="ilora task directory, or run directory (<output_dir>/<method>)")
    parser.add_argument("--output", required=True, type=Path, help="a new (or empty) directory")
    parser.add_argument("--adapter", help="plastic or stable (default: a run's best; a task's stable where it has one)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the base weights: a plain HF model")
    parser.add_argument("--model", help="the base model (default: the one the task recorded)")
    opts = parser.parse_args(argv)
    output = export(opts.source, opts.output, opts.adapter, opts.merge, opts.model)
    print(f"ilora: exported to {output} ({'merged model' if opts.merge else 'PEFT adapter'})")


def command_compare(argv: list[str]) -> None:
    from ilora.evaluation.report import compare

    parser = _simple_parser("ilora compare", "put several runs in one table and one plot")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (<output_dir>/<method>)")
    parser.add_argument("--out", type=Path, help="where compare.md and compare.png go (default: parent of the first)")
    opts = parser.parse_args(argv)
    print(compare(opts.runs, opts.out or opts.runs[0].parent))


def command_demo(argv: list[str]) -> None:
    from ilora.pipeline.demo import run_demo

    parser = _simple_parser("ilora demo", "offline continual-learning benchmark on SmolLM2-135M-Instruct")
    parser.add_argument("--full", action="store_true", help="the full benchmark: 4 tasks, every method, 3 seeds")
    parser.add_argument("--output_dir", type=Path, help="default runs/demo (runs/full with --full)")
    parser.add_argument("--seed", type=int, help="the demo's training seed (default 0; the data split stays the same)")
    opts = parser.parse_args(argv)
    if opts.seed is not None and (opts.full or opts.seed < 0):
        raise ILoRAError("--seed: the full benchmark runs seeds 0, 1 and 2" if opts.full else "--seed must be >= 0")
    print(run_demo(opts.full, opts.output_dir, seed=opts.seed))


RESUME_HINTS = {
    "train": "run it again with --resume_from_checkpoint true to continue from its last checkpoint",
    "run": "run the same command again to continue (finished tasks are kept; the unfinished one resumes "
    "from its last checkpoint)",
}


def _simple_parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": command_train,
    "run": command_run,
    "eval": command_eval,
    "compare": command_compare,
    "export": command_export,
    "demo": command_demo,
}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `ilora ... | head`: the reader left; nothing more to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that flush go nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off by its pipe


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = did_you_mean(command, COMMANDS)
        print(f"ilora: error: unknown command '{command}'{hint}; `ilora --help` lists the commands", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[command](rest)
    except ILoRAError as err:
        if debug:
            raise
        print(f"ilora {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        if debug:
            raise
        if is_refused_write(err):  # a write the machine refused (disk full, I/O error), wherever it happened
            print(f"ilora {command}: error: could not write: {' '.join(str(err).split())[:300]}", file=sys.stderr)
            return EXIT_WRITE_FAILED
        if isinstance(err, OSError):  # a path the file system refuses (name too long, permission)
            print(f"ilora {command}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            f"ilora {command}: interrupted; {RESUME_HINTS.get(command, 'nothing was marked finished')}", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
