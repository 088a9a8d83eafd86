"""Accuracy against the replay budget: ER and I-LoRA with each replay policy at three budgets, on the
tasks of a demo directory (one seed).

    ilora demo --output_dir runs/demo                  # first: writes the data and runs/demo/config.yaml
    python benchmarks/replay_budgets.py [--demo_dir runs/demo] [--shares 0.01 0.05 0.2]

Budgets are shares of the training stream's rows (every task's train file). Writes
<demo_dir>/replay/<policy>-<rows>/<method>/..., a table (AP and BWT: ER's plastic adapter, I-LoRA's
stable one) and replay_budgets.png beside it. Re-running continues where it stopped.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from ilora.pipeline.sequence import load_run_config, run_sequence

POLICIES = ("reservoir", "balanced", "surprise")
REPORTED = {"er": "plastic", "ilora": "stable"}


def stream_rows(config: dict, config_dir: Path) -> int:
    """Rows of every task's training file: what the buffer sees over the sequence."""
    total = 0
    for task in config["tasks"]:
        path = Path(task["train"])
        path = path if path.is_absolute() else config_dir / path
        total += sum(1 for line in path.read_text().splitlines() if line.strip())
    return total


def run(demo_dir: Path, method: str, policy: str, rows: int) -> Path:
    root = (demo_dir / "replay" / f"{policy}-{rows}").resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (demo_dir / "base_eval.json").is_file():  # the same model and test sets: reuse the base row
        shutil.copy(demo_dir / "base_eval.json", root / "base_eval.json")
    overrides = {"method": method, "output_dir": str(root), "replay_policy": policy, "ilora_buffer_size": rows}
    return run_sequence(load_run_config(demo_dir / "config.yaml", overrides))


def figures(run_dir: Path, method: str) -> tuple[float, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"][REPORTED[method]]
    return 100 * metrics["AP"], 100 * metrics["BWT"]


def table(results: dict, budgets: list[int], shares: list[float]) -> str:
    head = " | ".join(f"{r} rows ({100 * s:g}%)" for r, s in zip(budgets, shares))
    lines = [f"| method, policy | {head} |", "|---|" + "---|" * len(budgets)]
    for (method, policy), cells in results.items():
        row = " | ".join(f"{ap:.1f} / {bwt:+.1f}" for ap, bwt in cells)
        lines.append(f"| {method} ({REPORTED[method]}), {policy} | {row} |")
    return "AP / BWT (points)\n\n" + "\n".join(lines)


def picture(results: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (method, policy), cells in results.items():
        style = "-" if method == "ilora" else "--"
        for axis, values in zip(axes, zip(*cells)):
            axis.plot(budgets, values, style, marker="o", label=f"{method} {policy}")
    for axis, name in zip(axes, ("AP", "BWT")):
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_xlabel("replay buffer (rows)")
        axis.set_ylabel(f"{name} (points)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--methods", nargs="+", choices=list(REPORTED), default=list(REPORTED))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_path = args.demo_dir / "config.yaml"
    if not config_path.is_file():
        parser.error(f"{config_path} not found: run `ilora demo --output_dir {args.demo_dir}` first")
    stream = stream_rows(yaml.safe_load(config_path.read_text()), args.demo_dir)
    budgets = [max(1, round(share * stream)) for share in args.shares]
    start = time.time()
    results = {}
    for method in args.methods:
        for policy in POLICIES:
            results[(method, policy)] = [figures(run(args.demo_dir, method, policy, b), method) for b in budgets]
    text = table(results, budgets, args.shares)
    picture(results, budgets, args.demo_dir / "replay" / "replay_budgets.png")
    print(f"{stream} training rows in the stream\n\n{text}\n\n{time.time() - start:.0f} s")
    print(json.dumps({f"{m}/{p}": cells for (m, p), cells in results.items()}))
