"""How long one method x one seed x one order of `real4` takes, the whole `ilora benchmark` command
(data step from cached wheels, the base's scores, training, every evaluation), in fp32:

    python benchmarks/real4_speed.py [--methods ilora seq_lora] [--avx2]

`--avx2` restricts torch to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), what an
AVX2-only CPU runs. Each method runs alone, in a fresh directory; the figure to hold is about 8 minutes
per method on a 2-core CPU. Run it with nothing else on the machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ilora", "seq_lora"])
    parser.add_argument("--avx2", action="store_true", help="torch restricted to AVX2 kernels")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    capability = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"torch {torch.__version__}, capability {capability}, fp32, {torch.get_num_threads()} threads")
    figures = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory) / "real4"
            command = ["ilora", "benchmark", "real4", "bf16=false", "--methods", method, "--seeds", "0"]
            started = time.time()
            subprocess.run([*command, "--orders", "1", "--output_dir", str(root)], env=env, check=True)
            wall = time.time() - started
            run = root / "order-1" / "seed-0" / method
            cost = json.loads((run / "cost.json").read_text())
            timings = json.loads((run / "metrics.json").read_text())["timings"]["per_task"]
            train = sum(t["train_seconds"] for t in timings)
            evaluate = sum(t["eval_seconds"] for t in timings)
            print(
                f"{method}: {wall / 60:.1f} min for the command (training {train:.0f} s, evaluation after the "
                f"tasks {evaluate:.0f} s, peak RSS {cost['peak_rss_mb']:.0f} MB)"
            )
            figures[method] = {"minutes": round(wall / 60, 2), "train_s": round(train), "eval_s": round(evaluate)}
    print(json.dumps({"capability": capability, "precision": "fp32", "methods": figures}))
