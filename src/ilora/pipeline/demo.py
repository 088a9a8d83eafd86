"""The demo and the full benchmark: their plans (tasks, sizes, methods, seeds, settings) and how they run.

`ilora demo` builds the offline benchmark from real text in installed wheels, writes a run config beside
it, runs every method of the plan through `pipeline.sequence.run_sequence`, and returns the comparison table
with where the time went. Re-running continues where it stopped (finished tasks are skipped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from ilora.config.load import BUNDLED_CONFIG, load_config
from ilora.errors import ILoRAError
from ilora.evaluation import report
from ilora.files import read_json, write_json
from ilora.pipeline.sequence import load_run_config, run_sequence
from ilora.store.paths import check_directory_target

log = logging.getLogger(__name__)

# Sized for 15 minutes of `make demo` on a 2-core CPU without native bf16 (fp32; docs/results.md has the
# figures). Two tasks with short texts that SmolLM2 learns in 24 steps, and that interfere: plot-or-review
# is lost when spam is learned, so there is something to forget.
DEMO = {
    "tasks": ["kind", "spam"],
    "n_train": 96,
    "n_test": 48,
    "methods": ["seq_lora", "er", "ilora"],
    "seeds": [0],
    "max_chars": 100,
}
# Every registered method, I-LoRA first.
FULL = {
    "tasks": ["tweets", "debate", "reviews", "kind"],
    "n_train": 400,
    "n_test": 300,
    "methods": ["ilora", "ewc", "lwf", "derpp", "olora", "nlora", "inflora", "magmax", "seq_lora", "er", "joint"],
    "seeds": [0, 1, 2],
    "max_chars": 300,
}


def run_demo(
    full: bool = False,
    output_dir: Path | None = None,
    overrides: dict | None = None,
    seed: int | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> str:
    """Build the offline benchmark, run every method on it, and return the comparison table.
    `seed` replaces the demo's training seed (the full plan has its own three); `methods` and `seeds`
    run part of a plan (benchmarks/cl_benchmark.py)."""
    from ilora.data.corpora import build_benchmark

    plan = FULL if full else DEMO if seed is None else {**DEMO, "seeds": [seed]}
    plan = {**plan, "methods": methods or plan["methods"], "seeds": seeds or plan["seeds"]}
    root = Path(output_dir or ("runs/full" if full else "runs/demo"))
    _claim_directory(root, full, plan["tasks"])
    entries = build_benchmark(root / "data", plan["tasks"], plan["n_train"], plan["n_test"], 0, plan["max_chars"])
    tasks = [
        {**e, "train": str((root / "data" / e["train"]).resolve()), "test": str((root / "data" / e["test"]).resolve())}
        for e in entries
    ]
    config = {**_settings(full), **(overrides or {}), "tasks": tasks}
    tables = [
        _run_seed(root if len(plan["seeds"]) == 1 else root / f"seed-{s}", s, config, plan) for s in plan["seeds"]
    ]
    if len(plan["seeds"]) > 1:
        summary = report.aggregate([root / f"seed-{s}" for s in plan["seeds"]], plan["methods"], root)
        return "\n\n".join([summary, *tables])
    return tables[0]


def _claim_directory(root: Path, full: bool, tasks: list[str]) -> None:
    """`root` is new, empty, or an earlier demo's of the same tasks; the marker says it is the demo's."""
    check_directory_target(root, "--output_dir")
    if root.is_dir() and any(root.iterdir()):
        if not _is_demo_dir(root):
            raise ILoRAError(
                f"--output_dir {root} already holds files that are not an ilora demo; choose another directory"
            )
        _check_same_tasks(root, full, tasks)
    root.mkdir(parents=True, exist_ok=True)
    # says: this directory is the demo's to rewrite, and which tasks its runs trained on
    write_json(root / DEMO_MARKER, {"full": full, "tasks": tasks})


def _settings(full: bool) -> dict:
    """The bundled config, with the full plan's settings, or the demo's general text."""
    from ilora.data.corpora import general_text

    config = load_config(BUNDLED_CONFIG)
    if full:
        config.update(FULL_SETTINGS)
    else:  # general forgetting, on a text none of the tasks comes from (the full plan scores none)
        config.update(general=str(general_text()), general_windows=DEMO_GENERAL_WINDOWS)
    return config


def _run_seed(seed_root: Path, seed: int, settings: dict, plan: dict) -> str:
    """Every method of the plan at `seed`, from one config written beside the runs; their comparison."""
    seed_root.mkdir(parents=True, exist_ok=True)
    config_path = seed_root / "config.yaml"
    config = {**settings, "seed": seed, "output_dir": str(seed_root.resolve())}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for method in plan["methods"]:
        log.info("== %s, seed %d ==", method, seed)
        run_sequence(load_run_config(config_path, {"method": method}))
    runs = [seed_root / m for m in plan["methods"]]
    times = report.time_table([report.load_summary(r) for r in runs])
    return f"{report.compare(runs, seed_root)}\n\nWhere the time went (seed {seed}):\n\n{times}"


DEMO_GENERAL_WINDOWS = 16  # x cutoff_len 48 = 768 tokens of Hamlet: about a second per adapter
DEMO_MARKER = "ilora_demo.json"


def _check_same_tasks(root: Path, full: bool, tasks: list[str]) -> None:
    """A demo directory whose runs trained on other tasks cannot continue: say so, rather than let each
    run report its train files as changed."""
    if all(p.name in ("data", "config.yaml", DEMO_MARKER) for p in root.iterdir()):
        return  # nothing trained yet
    marker = root / DEMO_MARKER
    recorded = read_json(marker, "demo marker")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("tasks"), list):
        raise ILoRAError(f"{marker}: damaged demo marker (no task list)")
    earlier = recorded["tasks"]
    if earlier != tasks:
        raise ILoRAError(
            f"--output_dir {root} holds a demo of other tasks ({earlier}; this one trains on {tasks}): "
            "choose another directory or delete that one"
        )


def _is_demo_dir(root: Path) -> bool:
    return (root / DEMO_MARKER).is_file()


# The full benchmark: a buffer of 5% of the 1,600-row training stream (a generous buffer turns ER into
# joint training and hides every difference) and an EMA horizon of ~10 steps in a 200-step run. The
# learning rate warms up and decays within each task: at a constant 1e-3, joint training ended on
# whatever label its last batches favoured and learned no task to chance + 15. The full benchmark keeps
# its own sizes (cutoff, batch), apart from the demo's.
FULL_SETTINGS = {
    "ilora_buffer_size": 80,
    "ema_alpha": 0.9,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "cutoff_len": 64,
    "replay_batch_size": None,
    "per_device_train_batch_size": 8,
    "learning_rate": 0.001,
    "logging_steps": 5,
}
