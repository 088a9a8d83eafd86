"""How much of a long sequence's wall time goes to evaluation, by `eval_max_rows` and `eval_tasks`.

With `eval_tasks: all` every task's test set is scored after every task (both adapters for I-LoRA), so
evaluation grows with the square of the sequence's length while training grows linearly;
`seen_and_next` (the default) scores tasks 1..k+1 after task k. This runs a 10-task sequence of the
tiny learning Llama (tests/tiny.py) per setting and prints training and evaluation seconds from
metrics.json and the evaluation share of their sum.

    python benchmarks/eval_share.py                               # 10 tasks, 64 train / 200 test rows
    python benchmarks/eval_share.py --tasks 10 --eval_max_rows 0 50 100 --eval_tasks all seen_and_next
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import LEARNER, keyword_rows, save_tiny_model, write_jsonl

from ilora.cli import main as ilora
from ilora.runtime import precision


def run(root: Path, args, method: str, max_rows: int | None, eval_tasks: str) -> dict:
    tasks = []
    for k in range(args.tasks):
        name = f"task{k}"
        write_jsonl(root / f"{name}.train.jsonl", keyword_rows(args.train_rows, flipped=k % 2 == 1, offset=1000 * k))
        write_jsonl(
            root / f"{name}.test.jsonl", keyword_rows(args.test_rows, flipped=k % 2 == 1, offset=1000 * k + 500)
        )
        tasks.append(
            {
                "name": name,
                "train": f"{name}.train.jsonl",
                "test": f"{name}.test.jsonl",
                "choices": ["positive", "negative"],
            }
        )
    out = f"runs-{max_rows}-{eval_tasks}"
    config = {
        "model_name_or_path": "model",
        "output_dir": out,
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 0.02,
        "ilora_buffer_size": 16,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": args.bf16,
        "eval_batch_size": 32,
        "eval_max_rows": max_rows or None,
        "eval_tasks": eval_tasks,
        "tasks": tasks,
    }
    (root / f"{out}.yaml").write_text(yaml.safe_dump(config))
    assert ilora(["run", str(root / f"{out}.yaml"), "--method", method]) == 0
    summary = json.loads((root / out / method / "metrics.json").read_text())
    train = sum(t["train_seconds"] for t in summary["timings"]["per_task"])
    evaluate = sum(t["eval_seconds"] for t in summary["timings"]["per_task"])
    return {
        "train_s": train,
        "eval_s": evaluate,
        "eval_share": evaluate / (train + evaluate),
        "AP": summary["metrics"][list(summary["metrics"])[-1]]["AP"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--train_rows", type=int, default=64)
    p.add_argument("--test_rows", type=int, default=200)
    p.add_argument("--method", default="ilora")
    p.add_argument("--eval_max_rows", type=int, nargs="+", default=[0, 50], help="0: every row")
    p.add_argument("--eval_tasks", nargs="+", default=["all", "seen_and_next"], choices=("all", "seen_and_next"))
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    hardware = precision.detect("cpu")
    print(
        f"hardware: {hardware.label()}, precision: {'bf16' if args.bf16 else 'fp32'}; {args.tasks} tasks, "
        f"{args.train_rows} train / {args.test_rows} test rows each, method {args.method}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_model(root / "model", **LEARNER)
        for eval_tasks in args.eval_tasks:
            for max_rows in args.eval_max_rows:
                r = run(root, args, args.method, max_rows, eval_tasks)
                results[f"{max_rows or 'all'} rows, {eval_tasks}"] = r
                print(
                    f"eval_max_rows={max_rows or 'all':>4} eval_tasks={eval_tasks:<13}: train {r['train_s']:.1f} s, "
                    f"eval {r['eval_s']:.1f} s, eval share {100 * r['eval_share']:.0f}%, AP {100 * r['AP']:.1f}"
                )
    print(json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
