"""`ilora benchmark`: one of the real-text benchmarks (`data.real_text`: `real4`, `real_long`) for a list
of methods x seeds x orders, and its table.

The order of operations: build the data (once, cached), tune each method on the validation split if
asked (order 1, seed 0, a small grid of its main hyperparameter, the same number of runs for every
method), then train and score every (order, seed, method) as its own `ilora run` process, and write the
tables and the picture (`evaluation.benchmark_report`). Killed at any point, the same command continues:
finished tasks are skipped, a finished run is only checked and read.

    <output_dir>/data/                           task files, WikiText-2's test split, benchmark.json
    <output_dir>/tuning/<method>/<option>=<v>/   the tuning runs (scored on the validation split)
    <output_dir>/tuned.json                      the search and the chosen value of every method (or the
                                                 values taken from another benchmark's, `tuned_from`)
    <output_dir>/order-<o>/seed-<s>/<method>/    the scored runs (an `ilora run` directory + cost.json)
    <output_dir>/table.md, table.json, table.png the results
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ilora import methods as registry
from ilora.config.load import BUNDLED_CONFIG, load_config
from ilora.data import real_text
from ilora.errors import ILoRAError
from ilora.files import cache_dir, read_json, write_json
from ilora.store.paths import check_directory_target

log = logging.getLogger(__name__)

# Every registered method, I-LoRA first; joint training (every task at once) is the upper reference.
METHODS = ["ilora", "er", "derpp", "ewc", "lwf", "olora", "nlora", "inflora", "magmax", "seq_lora", "joint"]

# The benchmark's settings over the bundled demo config (SmolLM2-135M-Instruct, LoRA r 8 on q and v):
# sized so that one method x one seed x one order of real4 trains and scores within about 8 minutes
# on a 2-core CPU in fp32; I-LoRA, which scores two adapters after every task, takes about 9
# (docs/results.md has the figures). A buffer of 10% of real4's stream.
SETTINGS = {
    "cutoff_len": 64,
    "ilora_buffer_size": 40,
    "ema_alpha": 0.95,
    "per_device_train_batch_size": 4,
    "replay_batch_size": 4,
    "learning_rate": 0.002,
    "eval_tasks": "seen_and_next",
    "general_windows": 16,
    "logging_steps": 8,
}

# Equal tuning: the same budget for every method, three runs, each with one value of its main
# hyperparameter. Methods without one of their own (seq_lora, joint) run at their settings.
GRID: dict[str, tuple[str, list]] = {
    "ilora": ("ema_alpha", [0.9, 0.95, 0.98]),
    "er": ("replay_batch_size", [2, 4, 8]),
    "derpp": ("derpp_alpha", [0.1, 0.5, 1.0]),
    "ewc": ("ewc_lambda", [1.0, 100.0, 10000.0]),
    "lwf": ("lwf_weight", [0.1, 1.0, 10.0]),
    "olora": ("olora_lambda1", [0.05, 0.5, 5.0]),
    "nlora": ("nlora_lambda1", [0.004, 0.04, 0.4]),
    "inflora": ("inflora_threshold", [0.9, 0.95, 0.99]),
    "magmax": ("magmax_scaling", [0.5, 1.0, 1.5]),
}
TUNING_ORDER, TUNING_SEED = 1, 0
BENCHMARK_KEYS = {"method", "use_ilora", "seed", "output_dir", "tasks"}  # what each run's config sets
MARKER = "ilora_benchmark.json"
TUNED_FILE = "tuned.json"
COST_FILE = "cost.json"


def run_benchmark(
    name: str,
    output_dir: Path,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    orders: list[int] | None = None,
    tune: bool = False,
    overrides: dict | None = None,
    cache: Path | None = None,
    tuned_from: Path | None = None,
) -> str:
    """Build, (tune,) run and tabulate; returns the table. `overrides` go over the benchmark's settings
    (a model, a precision); `cache` is where the source wheels are kept; `tuned_from`, another
    benchmark's tuned.json (or its directory), gives the chosen values instead of tuning here."""
    from ilora.evaluation import benchmark_report

    plan = real_text.benchmark(name)
    methods, seeds, orders = methods or METHODS, seeds or [0, 1, 2], orders or [1]
    _check_choices(plan, methods, seeds, orders, overrides or {})
    borrowed = _borrow_tuned(Path(tuned_from), output_dir, tune) if tuned_from else {}
    build_data(name, output_dir, cache)
    if borrowed:
        write_json(output_dir / TUNED_FILE, {**borrowed, **_read_tuned(output_dir)})  # same values: ours kept
    settings = _settings(output_dir / "data", overrides or {})
    tuned = _tune(plan, output_dir, methods, settings) if tune else _read_tuned(output_dir)
    for order in orders:
        for seed in seeds:
            directory = output_dir / f"order-{order}" / f"seed-{seed}"
            config = _write_config(directory, plan, order, seed, real_text.TEST, settings)
            for method in methods:
                run_method(config, method, directory / method, _chosen(tuned, method))
    return benchmark_report.write(output_dir, plan, methods, seeds, orders, tuned)


def build_data(name: str, output_dir: Path, cache: Path | None = None) -> Path:
    """The benchmark's data in `<output_dir>/data` (built once; the wheels cached in `cache`)."""
    _claim(output_dir, name)
    real_text.build(name, output_dir / "data", cache or cache_dir() / "wheels")
    return output_dir / "data"


def _check_choices(
    plan: real_text.Benchmark, methods: list[str], seeds: list[int], orders: list[int], overrides: dict
) -> None:
    for method in methods:
        registry.get(method)  # one line naming an unknown method
    bad = [o for o in orders if o not in plan.orders]
    if bad:
        raise ILoRAError(f"{plan.name} has orders {sorted(plan.orders)}, not {bad}")
    for flag, values in (("--methods", methods), ("--seeds", seeds), ("--orders", orders)):
        if len(set(values)) != len(values):  # one run would stand in the table twice
            raise ILoRAError(f"{flag} {' '.join(map(str, values))}: a value is given twice")
    owned = sorted(set(overrides) & BENCHMARK_KEYS)
    if owned:
        raise ILoRAError(
            f"{', '.join(owned)}: set by the benchmark for each run (use --methods, --seeds, --output_dir)"
        )


def _claim(root: Path, name: str) -> None:
    """`root` is new, empty, or this benchmark's: the marker says so."""
    check_directory_target(root, "--output_dir")
    marker = root / MARKER
    if root.is_dir() and any(root.iterdir()):
        if not marker.is_file():
            raise ILoRAError(f"--output_dir {root} already holds files that are not an ilora benchmark's")
        recorded = read_json(marker, "benchmark marker")
        if not isinstance(recorded, dict):
            raise ILoRAError(f"{marker}: damaged benchmark marker (not a JSON object)")
        if recorded.get("benchmark") != name:
            raise ILoRAError(f"--output_dir {root} holds the benchmark {recorded.get('benchmark')!r}, not {name!r}")
    root.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"benchmark": name})


def _settings(data_dir: Path, overrides: dict) -> dict:
    config = load_config(BUNDLED_CONFIG)
    config.update(SETTINGS)
    config.update(general=str((data_dir / real_text.GENERAL_FILE).resolve()))
    config.update(overrides)
    return config


def _write_config(
    directory: Path, plan: real_text.Benchmark, order: int, seed: int, split: str, settings: dict
) -> Path:
    """The run config of one (order, seed): the tasks in that order, `split` scored. Every config sits
    two levels below the benchmark's directory (order-<o>/seed-<s>, tuning/<method>)."""
    directory.mkdir(parents=True, exist_ok=True)
    tasks = real_text.task_entries(plan, order, directory.parents[1] / "data", split)
    config = {**settings, "seed": seed, "output_dir": str(directory.resolve()), "tasks": tasks}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_method(config: Path, method: str, run_dir: Path, options: dict) -> None:
    """One `ilora run` of `method` in its own process (a kill loses at most the task in progress); its
    peak resident memory and wall time, the largest and the sum over sittings, into `cost.json`."""
    overrides = [f"{key}={value}" for key, value in options.items()]
    command = [sys.executable, "-m", "ilora.cli", "run", str(config), "--method", method, *overrides]
    log.info("== %s: %s", run_dir, " ".join(command[3:]))
    started = time.time()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise ILoRAError(f"`ilora run {config} --method {method}` failed (exit {process.returncode})")
    cost_path = run_dir / COST_FILE
    earlier = read_json(cost_path, "benchmark cost record") if cost_path.is_file() else {}
    write_json(
        cost_path,
        {
            "peak_rss_mb": max(usage.ru_maxrss / 1024, float(earlier.get("peak_rss_mb", 0.0))),  # Linux: kB
            "wall_seconds": float(earlier.get("wall_seconds", 0.0)) + time.time() - started,
            "sittings": int(earlier.get("sittings", 0)) + 1,
        },
    )


# ------------------------------------------------------------------ tuning
def _tune(plan: real_text.Benchmark, root: Path, methods: list[str], settings: dict) -> dict:
    """Each method's grid on the validation split (order 1, seed 0); the value of the best validation AP
    (the first of equals), with every value's AP, into tuned.json (kept for the methods not tuned now)."""
    from ilora.evaluation.report import load_summary

    for method in methods:
        if method not in GRID:
            continue
        option, values = GRID[method]
        directory = root / "tuning" / method
        config = _write_config(directory, plan, TUNING_ORDER, TUNING_SEED, real_text.VAL, settings)
        search = {}
        for value in values:
            run_dir = directory / f"{option}={value}"
            run_method(config, method, run_dir / method, {option: value, "output_dir": str(run_dir.resolve())})
            search[str(value)] = _main_ap(load_summary(run_dir / method))
        best = max(values, key=lambda v: search[str(v)])  # max keeps the first of equal values
        entry = {"option": option, "value": best, "validation_ap": search}
        # Read again before writing: a benchmark command tuning other methods meanwhile keeps its entries.
        write_json(root / TUNED_FILE, {**_read_tuned(root), method: entry})
    return _read_tuned(root)


def _main_ap(summary: dict) -> float:
    """The AP a method is judged by: its last evaluated adapter, the one export prefers (I-LoRA's
    stable, MagMax's merged; the only one of most methods)."""
    return float(list(summary["metrics"].values())[-1]["AP"])


def _read_tuned(root: Path) -> dict:
    """tuned.json: {method: {"option", "value", "validation_ap"}} (empty before any tuning)."""
    path = root / TUNED_FILE
    return _read_tuning_record(path, "; delete it to tune again") if path.is_file() else {}


def _borrow_tuned(source: Path, root: Path, tune: bool) -> dict:
    """The chosen values of another benchmark's tuned.json (real4's for real_long, say), each entry
    marked with the file it came from; checked before anything is written. Refused beside --tune, and
    where `root` already chose another value for one of the methods (its runs used that one)."""
    if tune:
        raise ILoRAError("--tune and --tuned_from: tune here or take values tuned elsewhere, not both")
    path = source / TUNED_FILE if source.is_dir() else source
    if path.resolve() == (root / TUNED_FILE).resolve():
        raise ILoRAError(f"--tuned_from {path}: this benchmark's own record, not another's")
    # An entry already borrowed keeps the file it was tuned in.
    borrowed = {m: {"tuned_in": str(path.resolve()), **entry} for m, entry in _read_tuning_record(path).items()}
    here = _read_tuned(root)
    clash = sorted(m for m in borrowed if m in here and _chosen(here, m) != _chosen(borrowed, m))
    if clash:
        raise ILoRAError(f"--tuned_from {path}: {root / TUNED_FILE} already chose other values for {', '.join(clash)}")
    return borrowed


def _read_tuning_record(path: Path, remedy: str = "") -> dict:
    """A tuned.json, this benchmark's or one given with --tuned_from: each entry is a method of the grid
    with the grid's option and a finite number, since it becomes a `key=value` of every scored run (an
    `output_dir` or a NaN there would move or break the runs)."""
    tuned = read_json(path, "tuning record")
    damaged = not isinstance(tuned, dict) or not all(_sound_entry(m, e) for m, e in tuned.items())
    if damaged:
        raise ILoRAError(
            f"{path}: damaged tuning record (each method of the grid needs its option and a number){remedy}"
        )
    return tuned


def _sound_entry(method: str, entry) -> bool:
    if not isinstance(entry, dict) or method not in GRID or entry.get("option") != GRID[method][0]:
        return False
    value = entry.get("value")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chosen(tuned: dict, method: str) -> dict:
    entry = tuned.get(method)
    return {entry["option"]: entry["value"]} if entry else {}
