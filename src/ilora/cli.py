"""`ilora` command line. Every refusal is one line on stderr (`--debug` shows the traceback).

Exit codes: 0 done; 2 bad input (nothing of the user's touched); 1 training diverged or collapsed
(nothing marked finished), or a write the machine refused; 130 interrupted (re-run the same command to
resume); 141 when the reader of the output went away. Each command imports what it needs when it runs:
`ilora --help` and the command list answer without loading torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ilora import methods
from ilora.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_WRITE_FAILED, ILoRAError, did_you_mean, is_refused_write


def usage() -> str:
    names = "|".join(methods.names())
    return f"""usage: ilora COMMAND [ARGS]

commands:
  train     train one task: ilora train CONFIG.yaml [key=value ...] [--flag value ...] (`ilora train --help`
            lists every flag)
  run       train and evaluate a task sequence: ilora run CONFIG.yaml [key=value ...] [--method {names}]
  eval      score adapters on a config's tasks: ilora eval --model M --adapter DIR --tasks CONFIG.yaml
  compare   one table and plot for several runs: ilora compare RUN_DIR... [--out DIR]
  export    a merged model or a clean PEFT adapter: ilora export TASK_OR_RUN_DIR --output DIR [--merge];
            every task's adapters for vLLM: ilora export RUN_DIR --serve DIR
  demo      the offline benchmark on SmolLM2-135M and real text: ilora demo [--full]
  benchmark a real-text benchmark for methods x seeds x orders: ilora benchmark real4 [--tune]

add --debug to any command for full tracebacks."""


class OneLineParser(argparse.ArgumentParser):
    """argparse errors become ILoRAError: one line, exit code 2, like every other bad input."""

    def error(self, message: str):
        raise ILoRAError(message)


def command_train(argv: list[str]) -> None:
    from ilora.pipeline.task import parse, train_task

    output_dir = train_task(parse(argv))
    print(f"ilora: task written to {output_dir}")


def command_run(argv: list[str]) -> None:
    parser = OneLineParser(prog="ilora run", description="train and evaluate a task sequence")
    parser.add_argument("config", type=Path, help="run config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any key of the config")
    parser.add_argument("--method", help="override the config's method (a name in ilora.methods)")
    parser.add_argument("--output_dir", help="override the config's output_dir")
    opts = parser.parse_intermixed_args(argv)
    from ilora.config.load import parse_overrides
    from ilora.pipeline.sequence import load_run_config, run_sequence

    overrides = parse_overrides(opts.overrides)
    for key in ("method", "output_dir"):
        if getattr(opts, key):
            if key in overrides:
                raise ILoRAError(f"{key} is given twice: as --{key} and as {key}=...")
            overrides[key] = getattr(opts, key)
    run_dir = run_sequence(load_run_config(opts.config, overrides))
    print(f"ilora: run written to {run_dir} (report.md, metrics.json)")


def command_eval(argv: list[str]) -> None:
    parser = OneLineParser(prog="ilora eval", description="score a trained adapter (or a task) on a config's tasks")
    parser.add_argument("--model", required=True, help="base model directory or 'smollm2'")
    parser.add_argument("--adapter", required=True, type=Path, help="PEFT adapter directory or ilora task directory")
    parser.add_argument("--tasks", required=True, type=Path, help="run config whose tasks are scored")
    opts = parser.parse_args(argv)
    from ilora.pipeline.evaluate import evaluate_adapters

    print(json.dumps(evaluate_adapters(opts.model, opts.adapter, opts.tasks), indent=2))


def command_export(argv: list[str]) -> None:
    parser = OneLineParser(
        prog="ilora export", description="a task's or a run's adapter as a merged model or a clean PEFT adapter"
    )
    parser.add_argument("source", type=Path, help="ilora task directory, or run directory (<output_dir>/<method>)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", type=Path, help="a new (or empty) directory")
    target.add_argument(
        "--serve", type=Path, help="every task's adapters of a run, for vLLM: a new (or empty) directory"
    )
    parser.add_argument("--copy_base", action="store_true", help="with --serve: copy the base model beside them")
    parser.add_argument("--adapter", help="plastic or stable (default: a run's best; a task's stable where it has one)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the base weights: a plain HF model")
    parser.add_argument("--model", help="the base model (default: the one the task recorded)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model directory")
    opts = parser.parse_args(argv)
    from ilora.pipeline.export import export, serve

    if opts.serve:
        if opts.merge or opts.adapter or opts.model:
            raise ILoRAError(
                "--serve exports every task's adapters of a run: --merge, --adapter and --model do not apply"
            )
        output = serve(opts.source, opts.serve, opts.copy_base, opts.trust_remote_code)
        print(f"ilora: adapters for serving in {output} (serve.json holds the vllm serve command)")
        return
    if opts.copy_base:
        raise ILoRAError("--copy_base goes with --serve")
    output = export(opts.source, opts.output, opts.adapter, opts.merge, opts.model, opts.trust_remote_code)
    print(f"ilora: exported to {output} ({'merged model' if opts.merge else 'PEFT adapter'})")


def command_compare(argv: list[str]) -> None:
    parser = OneLineParser(prog="ilora compare", description="put several runs in one table and one plot")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (<output_dir>/<method>)")
    parser.add_argument("--out", type=Path, help="where compare.md and compare.png go (default: parent of the first)")
    opts = parser.parse_args(argv)
    from ilora.evaluation.report import compare

    print(compare(opts.runs, opts.out or opts.runs[0].parent))


def command_benchmark(argv: list[str]) -> None:
    from ilora.data.real_text import BENCHMARKS
    from ilora.pipeline.benchmark import METHODS

    parser = OneLineParser(
        prog="ilora benchmark", description="a real-text benchmark (docs/benchmarks.md): methods x seeds x orders"
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="real4 or real_long")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a setting of every run")
    parser.add_argument("--output_dir", type=Path, help="default runs/<name>")
    parser.add_argument("--methods", nargs="+", help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2")
    parser.add_argument("--orders", type=int, nargs="+", help="default: 1")
    parser.add_argument("--tune", action="store_true", help="tune each method on the validation split first")
    parser.add_argument(
        "--tuned_from", type=Path, metavar="TUNED_JSON", help="use the values another benchmark's --tune chose"
    )
    parser.add_argument("--data_only", action="store_true", help="build the data and stop")
    opts = parser.parse_intermixed_args(argv)
    from ilora.config.load import parse_overrides
    from ilora.pipeline.benchmark import build_data, run_benchmark

    output_dir = opts.output_dir or Path("runs") / opts.name
    if opts.data_only:
        print(f"ilora: {opts.name} data in {build_data(opts.name, output_dir)}")
        return
    overrides = parse_overrides(opts.overrides)
    chosen = {"tune": opts.tune, "tuned_from": opts.tuned_from}
    print(run_benchmark(opts.name, output_dir, opts.methods, opts.seeds, opts.orders, overrides=overrides, **chosen))


def command_demo(argv: list[str]) -> None:
    parser = OneLineParser(prog="ilora demo", description="offline continual-learning benchmark on SmolLM2-135M")
    parser.add_argument("--full", action="store_true", help="the full benchmark: 4 tasks, every method, 3 seeds")
    parser.add_argument("--output_dir", type=Path, help="default runs/demo (runs/full with --full)")
    parser.add_argument("--seed", type=int, help="the demo's training seed (default 0; the data split stays the same)")
    opts = parser.parse_args(argv)
    if opts.seed is not None and (opts.full or opts.seed < 0):
        raise ILoRAError("--seed: the full benchmark runs seeds 0, 1 and 2" if opts.full else "--seed must be >= 0")
    from ilora.pipeline.demo import run_demo

    print(run_demo(opts.full, opts.output_dir, seed=opts.seed))


RESUME_HINTS = {
    "train": "run it again with --resume_from_checkpoint true to continue from its last checkpoint",
    "run": "run the same command again to continue (finished tasks are kept; the unfinished one resumes "
    "from its last checkpoint)",
}

COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": command_train,
    "run": command_run,
    "eval": command_eval,
    "compare": command_compare,
    "export": command_export,
    "demo": command_demo,
    "benchmark": command_benchmark,
}


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        if code == 0 and "torch.distributed" in sys.modules:  # launched by torchrun or accelerate: leave cleanly
            from ilora.runtime import distributed

            distributed.finish()
        return code
    except BrokenPipeError:  # `ilora ... | head`: the reader left; nothing more to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that flush go nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off by its pipe


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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
        hint = RESUME_HINTS.get(command, "nothing was marked finished")
        print(f"ilora {command}: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
