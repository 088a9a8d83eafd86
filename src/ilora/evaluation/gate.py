"""A forgetting gate for a release: the model a run would release (the one `ilora export` takes) may lose
at most so much of what it could do. Two thresholds, each optional:

- `gate_general_ppl`: its perplexity on the general text after the last task may rise at most this share
  above the base model's (0.05: 5%);
- `gate_task_drop`: on every task, its final accuracy may be at most this many points below the best it
  reached on that task after training it.

A breach does not stop the run: metrics.json and report.md are written as usual and say what breached;
the command then exits with its own code (`errors.EXIT_GATE`), so a CI job can stop the release. Pure:
a function of metrics.json.
"""

from __future__ import annotations


def released(summary: dict, available: list[str] | None = None) -> str:
    """The evaluated model a run releases: the best average accuracy after the last task, a tie going to
    the method's last (I-LoRA's stable adapter); only among `available` when given."""
    reports = [r for r in summary["metrics"] if available is None or r in available]
    return max(reports, key=lambda r: (summary["metrics"][r]["AP"], reports.index(r)))


def check(summary: dict, general_ppl: float | None, task_drop: float | None) -> dict:
    """What the gate found on `summary` (metrics.json): the model it judged, each threshold's figures,
    and every breach in words."""
    model = released(summary)
    result = {"model": model, "breaches": []}
    if general_ppl is not None:
        general = summary["general"]
        rise = general["perplexity"][model][-1] / general["base"] - 1.0
        result["general_ppl"] = {"limit": general_ppl, "rise": rise}
        if rise > general_ppl:
            result["breaches"].append(
                f"{model}'s general perplexity rose {100 * rise:.1f}% over the base model's "
                f"(at most {100 * general_ppl:.1f}% allowed)"
            )
    if task_drop is not None:
        drops = task_drops(summary["matrices"][model], summary["tasks"], summary["trains_jointly"])
        result["task_drop"] = {"limit": task_drop, "drops": drops}
        for task, drop in drops.items():
            if drop > task_drop:
                result["breaches"].append(
                    f"{model} ends {drop:.1f} points below its best on task {task!r} (at most {task_drop:g} allowed)"
                )
    return result


def task_drops(R: list[list[float | None]], tasks: list[str], joint: bool) -> dict[str, float]:
    """Per task, in points: the best accuracy after it was trained minus the final one. Row 0 of `R` is
    the base model; task i is trained at row i + 1 (joint training: every task at row 1)."""
    drops = {}
    for i, task in enumerate(tasks):
        trained = 1 if joint else i + 1
        seen = [row[i] for row in R[trained:] if row[i] is not None]
        drops[task] = 100 * (max(seen) - R[-1][i])
    return drops
