"""How far real runs are from the collapse check: for every finished task under the given directories,
each evaluated model's loss on its last training batch against the ceiling that would refuse it
(max(untrained loss, uniform guess) + COLLAPSE_MARGIN), and the largest adapter weight against
EXPLODED_WEIGHT. Every row must say `ok`; the margins show by how much.

    python benchmarks/collapse_margins.py runs/demo [runs/full ...]
"""

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from ilora.methods.base import COLLAPSE_MARGIN, EXPLODED_WEIGHT


def largest_weight(task: Path, manifest: dict) -> float:
    largest = 0.0
    for adapter in manifest["adapters"].values():
        with safe_open(str(task / adapter / "adapter_model.safetensors"), framework="pt") as f:
            largest = max([largest] + [float(f.get_tensor(k).abs().max()) for k in f.keys()])
    return largest


def rows(root: Path):
    for path in sorted(root.rglob("ilora_task.json")):
        manifest = json.loads(path.read_text())
        check = manifest.get("collapse_check") or {}
        if not check:
            continue
        ceiling = max(check["untrained_loss"], check["uniform_loss"]) + COLLAPSE_MARGIN
        losses = {k[: -len("_loss")]: v for k, v in check.items() if k not in ("untrained_loss", "uniform_loss")}
        weight = largest_weight(path.parent, manifest)
        ok = all(v <= ceiling for v in losses.values()) and weight <= EXPLODED_WEIGHT
        shown = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
        yield (
            f"| {path.parent.relative_to(root)} | {shown} | {ceiling:.2f} | {min(ceiling - v for v in losses.values()):.2f} "
            f"| {weight:.3g} | {'ok' if ok else 'REFUSED'} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path)
    args = parser.parse_args()
    print("| task | loss on its last batch | ceiling | smallest margin (nats) | largest adapter weight | check |")
    print("|---|---|---|---|---|---|")
    for root in args.roots:
        for row in rows(root):
            print(row)
