"""One-seed ablation of I-LoRA's own settings on the full benchmark: each variant changes one setting of
the benchmark's I-LoRA run and is compared with it.

    python benchmarks/cl_benchmark.py            # first: writes the data and runs/full/seed-<s>/config.yaml
    python benchmarks/ablation.py [--benchmark_dir runs/full] [--seed 0] [--variants NAME ...]

Writes runs/full/ablation/<variant>/ilora/... and prints a table (AP and forgetting, stable and
plastic). Re-running continues where it stopped: finished tasks are skipped.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from ilora.pipeline.sequence import load_run_config, run_sequence

VARIANTS = {
    "ema_alpha=0.99": {"ema_alpha": 0.99},  # a ~100-step horizon instead of ~10: the stable adapter lags a task
    "consistency_weight=0": {"consistency_weight": 0.0},  # the EMA alone: ER plus a weight average
    "hidden_state_layers=[10,20,-1]": {"hidden_state_layers": [10, 20, -1]},  # consistency on middle layers too
}


def run_variant(seed_dir: Path, name: str, change: dict) -> Path:
    root = seed_dir.parent / "ablation" / name
    root.mkdir(parents=True, exist_ok=True)
    if (seed_dir / "base_eval.json").is_file():  # the same model and test sets: reuse the base row
        shutil.copy(seed_dir / "base_eval.json", root / "base_eval.json")
    overrides = {**change, "method": "ilora", "output_dir": str(root.resolve())}
    return run_sequence(load_run_config(seed_dir / "config.yaml", overrides))


def table(rows: dict[str, Path]) -> str:
    lines = [
        "| I-LoRA variant | AP stable | forgetting stable | AP plastic | forgetting plastic |",
        "|---|---|---|---|---|",
    ]
    for name, run_dir in rows.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        cells = [f"{100 * metrics[a]['AP']:.1f} | {100 * metrics[a]['forgetting']:.1f}" for a in ("stable", "plastic")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark_dir", type=Path, default=Path("runs/full"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seed_dir = args.benchmark_dir / f"seed-{args.seed}"
    if not (seed_dir / "ilora" / "metrics.json").is_file():
        parser.error(f"{seed_dir}/ilora/metrics.json not found: run benchmarks/cl_benchmark.py first")
    start = time.time()
    rows = {"benchmark settings": seed_dir / "ilora"}
    for name in args.variants:
        rows[name] = run_variant(seed_dir, name, VARIANTS[name])
    print(table(rows))
    print(f"total {time.time() - start:.0f} s")
