"""The full continual-learning benchmark (same as `ilora demo --full`): four real-text tasks on
SmolLM2-135M-Instruct, every registered method (ilora's stable and plastic adapters, ewc, lwf, derpp,
olora, nlora, inflora, magmax, seq_lora, er, joint), three seeds; seed 0 of every method first.

    python benchmarks/cl_benchmark.py [--output_dir runs/full] [--methods M ...] [--seeds S ...]

Writes runs/full/seed-<s>/<method>/{metrics.json,report.md,...} and runs/full/summary.{md,json}
(mean ± sd over seeds of AP, AvgAcc, BWT, FWT, forgetting, and each task's final accuracy).
Re-running continues where it stopped: finished tasks are skipped.
"""

import argparse
import logging
import time
from pathlib import Path

from ilora.pipeline.demo import FULL, run_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/full"))
    parser.add_argument("--methods", nargs="+", choices=FULL["methods"], help="part of the plan (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", choices=FULL["seeds"], help="part of the plan (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    print(run_demo(full=True, output_dir=args.output_dir, methods=args.methods, seeds=args.seeds))
    print(f"total {time.time() - start:.0f} s")
