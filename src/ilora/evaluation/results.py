"""metrics.json: the accuracy matrices of a run, the continual-learning metrics computed from them, the
prediction counts, the general-ability row, times and versions. `report` draws from it."""

from __future__ import annotations

from collections import Counter

from ilora.evaluation import metrics


def summary(method: str, run, adapters, base_row, results, timings, seconds, tests, joint: bool) -> dict:
    """metrics.json: accuracy matrices, CL metrics (AP only for one joint stage), prediction counts, times."""
    names = [t.name for t in run.tasks]
    matrices, metric_table, distributions = {}, {}, {}
    for adapter in adapters:
        rows = [base_row] + [r["scores"][adapter] for r in results]
        # None: a task not scored at that point (eval_tasks: seen_and_next leaves out cells no metric uses)
        R = [[row[name]["accuracy"] if name in row else None for name in names] for row in rows]
        matrices[adapter] = R
        if joint:
            metric_table[adapter] = {"AP": sum(R[-1]) / len(names)}  # one training stage: no transfer metrics
        else:
            metric_table[adapter] = metrics.all_metrics(R)
        distributions[adapter] = [
            {name: dict(Counter(row[name]["predictions"]).most_common()) for name in names if name in row}
            for row in rows
        ]
    return {
        "method": method,
        "trains_jointly": joint,
        "tasks": names,
        "test_rows": {t.name: len(t) for t in tests},
        "eval_max_rows": run.eval_max_rows,
        "eval_tasks": run.eval_tasks,
        "gold_distribution": {t.name: dict(Counter(t.answers).most_common()) for t in tests},
        "matrices": matrices,
        "metrics": metric_table,
        "prediction_distribution": distributions,
        "timings": {"per_task": timings, "total_seconds": seconds},
        "versions": versions(),
    }


def general_summary(run, windows: list[list[int]], base: float, results: list[dict], adapters: list[str]) -> dict:
    """metrics.json's general-forgetting row: perplexity before training and after each task."""
    return {
        "file": run.general,
        "windows": len(windows),
        "tokens": sum(len(w) for w in windows),
        "base": base,
        "perplexity": {a: [r["general"][a] for r in results] for a in adapters},
    }


def versions() -> dict:
    import peft
    import torch
    import transformers

    from ilora import __version__

    return {
        "ilora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
