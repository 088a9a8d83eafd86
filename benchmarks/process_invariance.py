"""The same numbers on one process or two: the demo's two tasks on SmolLM2-135M-Instruct, trained once by
one process at batch 4 and once by two CPU processes (torchrun, gloo) at batch 2 each, same seed, fp32;
prints the largest difference of every adapter tensor (relative to its largest entry) after each task,
and both runs' accuracy matrices.

    python benchmarks/process_invariance.py [--methods ilora er] [--output_dir runs/process_invariance]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from ilora.config.load import BUNDLED_CONFIG, load_config
from ilora.data.corpora import build_benchmark
from ilora.pipeline.demo import DEMO


def write_config(root: Path, name: str, per_device_batch: int) -> Path:
    entries = build_benchmark(root / "data", DEMO["tasks"], DEMO["n_train"], DEMO["n_test"], 0, DEMO["max_chars"])
    tasks = [{**e, "train": str(root / "data" / e["train"]), "test": str(root / "data" / e["test"])} for e in entries]
    config = load_config(BUNDLED_CONFIG)
    config.update(
        tasks=tasks,
        bf16=False,  # under bf16 a row's result depends on its batch's padded length: 1e-3, not float noise
        per_device_train_batch_size=per_device_batch,
        replay_batch_size=per_device_batch,
        output_dir=str(root / name),
    )
    if per_device_batch == 2:
        config["ddp_backend"] = "gloo"  # CPU processes
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def largest_gaps(one: Path, two: Path) -> dict[str, float]:
    gaps = {}
    for adapter in sorted(p.name for p in one.iterdir() if (p / "adapter_model.safetensors").is_file()):
        a, b = (load_file(str(d / adapter / "adapter_model.safetensors")) for d in (one, two))
        gaps[adapter] = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    return gaps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ilora", "er"])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/process_invariance"))
    args = parser.parse_args()
    root = args.output_dir.resolve()
    one, two = write_config(root, "one", 4), write_config(root, "two", 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    figures = {}
    for method in args.methods:
        subprocess.run([sys.executable, "-m", "ilora.cli", "run", str(one), "--method", method], check=True)
        subprocess.run([*torchrun, "-m", "ilora.cli", "run", str(two), "--method", method], check=True)
        print(f"\n{method}: 1 process x batch 4 against 2 processes x batch 2, fp32")
        worst = 0.0
        for task in sorted(p.name for p in (root / "one" / method / "tasks").iterdir()):
            gaps = largest_gaps(root / "one" / method / "tasks" / task, root / "two" / method / "tasks" / task)
            worst = max([worst, *gaps.values()])
            print(f"  after {task}: " + ", ".join(f"{a} {g:.1e}" for a, g in gaps.items()))
        matrices = [json.loads((root / r / method / "metrics.json").read_text())["matrices"] for r in ("one", "two")]
        print(f"  accuracy matrices equal: {matrices[0] == matrices[1]}")
        figures[method] = {"matrices_equal": matrices[0] == matrices[1], "largest_relative_gap": worst}
        for adapter, rows in matrices[0].items():
            print(f"  {adapter}: one {rows[-1]}, two {matrices[1][adapter][-1]} (after the last task)")
    print(json.dumps(figures))
