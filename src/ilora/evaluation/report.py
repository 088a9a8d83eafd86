"""Human-readable results: `report.md` with tables, a heatmap of the accuracy matrix and each task's
accuracy over the sequence (PNG, headless matplotlib); `compare` puts several runs side by side."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ilora.errors import ILoRAError
from ilora.files import finite_number, read_json, write_json
from ilora.store.paths import check_directory_target

METRIC_ORDER = ("AP", "AvgAcc", "BWT", "FWT", "forgetting")


def fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header row and rule."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def matrix_table(R: list[list[float]], tasks: list[str], joint: bool = False) -> list[str]:
    lines = table_head(["after \\ on", *tasks])
    for k, row in enumerate(R):
        label = "before training" if k == 0 else ("all tasks (joint)" if joint else f"{k}. {tasks[k - 1]}")
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in row) + " |")
    return lines


def write_report(run_dir: Path, summary: dict) -> None:
    tasks, joint = summary["tasks"], summary["trains_jointly"]
    lines = [
        f"# ilora run: {summary['method']}",
        "",
        f"Tasks in order: {', '.join(tasks)}.",
        "Accuracies and metrics in percent (BWT, FWT, forgetting in points).",
        "",
    ]
    for adapter, R in summary["matrices"].items():
        lines += [f"## {adapter} adapter", "", *matrix_table(R, tasks, joint), ""]
        values = summary["metrics"][adapter]
        names = [m for m in METRIC_ORDER if m in values]
        lines += table_head(names)
        lines += ["| " + " | ".join(fmt(values[m]) for m in names) + " |", ""]
        lines += ["Final predictions per task (label: count), gold in brackets:", ""]
        final = summary["prediction_distribution"][adapter][-1]
        for task in tasks:
            lines.append(f"- {task}: {final[task]} [{summary['gold_distribution'][task]}]")
        lines.append("")
    if summary.get("general"):
        lines += general_table(summary) + ["", "![general perplexity](general.png)", ""]
        _general_plot(run_dir / "general.png", summary)
    if summary.get("gate"):
        lines += gate_lines(summary["gate"]) + [""]
    timings = summary["timings"]
    lines += [
        f"Total time: {timings['total_seconds']:.0f} s.",
        "",
        "![accuracy matrix](heatmap.png)",
        "",
        "![accuracy over the sequence](curves.png)",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    _heatmaps(run_dir / "heatmap.png", summary)
    _curves(run_dir / "curves.png", summary)


def gate_lines(gate: dict) -> list[str]:
    """The forgetting gate's verdict on the released model."""
    verdict = "**BREACHED**" if gate["breaches"] else "passed"
    lines = ["## Forgetting gate", "", f"The released model ({gate['model']}): {verdict}.", ""]
    if "general_ppl" in gate:
        rise, limit = gate["general_ppl"]["rise"], gate["general_ppl"]["limit"]
        lines.append(f"- general perplexity: {100 * rise:+.1f}% over the base model (limit {100 * limit:.1f}%)")
    if "task_drop" in gate:
        worst = max(gate["task_drop"]["drops"].items(), key=lambda item: item[1])
        lines.append(
            f"- largest drop below a task's best: {worst[1]:.1f} points on {worst[0]} "
            f"(limit {gate['task_drop']['limit']:g})"
        )
    return lines + [f"- {breach}" for breach in gate["breaches"]]


def general_table(summary: dict) -> list[str]:
    """General forgetting: perplexity on the held-out general text before training and after each task."""
    general, tasks = summary["general"], summary["tasks"]
    adapters = list(general["perplexity"])
    lines = [
        f"## General ability: perplexity on {Path(general['file']).name} ({general['tokens']} tokens; lower is better)",
        "",
        *table_head(["after", *adapters]),
        "| before training | " + " | ".join(f"{general['base']:.2f}" for _ in adapters) + " |",
    ]
    for k in range(len(general["perplexity"][adapters[0]])):
        label = "all tasks (joint)" if summary["trains_jointly"] else f"{k + 1}. {tasks[k]}"
        lines.append(f"| {label} | " + " | ".join(f"{general['perplexity'][a][k]:.2f}" for a in adapters) + " |")
    return lines


def _general_plot(path: Path, summary: dict) -> None:
    general = summary["general"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for adapter, values in general["perplexity"].items():
        ax.plot(range(len(values) + 1), [general["base"], *values], marker="o", label=adapter)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title(f"{summary['method']}: general text perplexity")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmaps(path: Path, summary: dict) -> None:
    tasks, matrices = summary["tasks"], summary["matrices"]
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.5 * len(matrices), 3.8), squeeze=False)
    for ax, (adapter, R) in zip(axes[0], matrices.items()):
        image = ax.imshow(
            [[math.nan if v is None else 100 * v for v in row] for row in R], vmin=0, vmax=100, cmap="viridis"
        )
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(R)), ["base"] + [f"after {k}" for k in range(1, len(R))])
        for k, row in enumerate(R):
            for i, value in enumerate(row):
                if value is not None:  # not scored at that point (eval_tasks: seen_and_next)
                    ax.text(i, k, f"{100 * value:.0f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_title(f"{summary['method']} / {adapter}")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _curves(path: Path, summary: dict) -> None:
    tasks = summary["tasks"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for adapter, R in summary["matrices"].items():
        style = "-" if adapter == next(iter(summary["matrices"])) else "--"  # the first adapter solid
        for i, task in enumerate(tasks):
            ax.plot(
                range(len(R)),
                [math.nan if row[i] is None else 100 * row[i] for row in R],
                style,
                marker="o",
                label=f"{task} ({adapter})",
            )
    ax.set_xticks(range(len(next(iter(summary["matrices"].values())))))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"{summary['method']}: accuracy on each task over the sequence")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------ compare
def load_summary(run_dir: Path) -> dict:
    """A run's metrics.json, checked: one line naming the file if it is damaged."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ILoRAError(f"{run_dir}: no metrics.json (is it a finished `ilora run` directory?)")
    summary = read_json(path, "run summary")
    problem = _summary_problem(summary)
    if problem:
        raise ILoRAError(f"{path}: damaged ({problem})")
    return summary


def _summary_problem(summary) -> str | None:
    if not isinstance(summary, dict):
        return "not a JSON object"
    tasks, matrices, values = summary.get("tasks"), summary.get("matrices"), summary.get("metrics")
    if not isinstance(summary.get("method"), str):
        return "no method"
    if not isinstance(summary.get("trains_jointly"), bool):
        return "no trains_jointly"
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        return "no task list"
    if not isinstance(matrices, dict) or not matrices or not isinstance(values, dict):
        return "no accuracy matrices or metrics"
    for adapter, R in matrices.items():
        if (
            not isinstance(R, list)
            or len(R) < 2
            or any(not isinstance(row, list) or len(row) != len(tasks) for row in R)
        ):
            return f"the {adapter} accuracy matrix does not have one column per task"
        # cells between may be None (not scored); the base row and the final row never are
        if not all(v is None or _is_accuracy(v) for row in R for v in row) or None in R[0] + R[-1]:
            return f"the {adapter} accuracy matrix holds a value that is not an accuracy"
        metrics = values.get(adapter)
        if not isinstance(metrics, dict) or not all(v is None or finite_number(v) for v in metrics.values()):
            return f"the {adapter} metrics are missing or not finite"
    return _timings_problem(summary.get("timings"))


def _timings_problem(timings) -> str | None:
    """`timings`: total_seconds, and per task its train_seconds and eval_seconds, all numbers."""
    if not isinstance(timings, dict) or not finite_number(timings.get("total_seconds")):
        return "no timings (total_seconds)"
    per_task = timings.get("per_task")
    if not isinstance(per_task, list) or not all(
        isinstance(t, dict) and finite_number(t.get("train_seconds")) and finite_number(t.get("eval_seconds"))
        for t in per_task
    ):
        return "timings.per_task must list train_seconds and eval_seconds for each task"
    return None


def _is_accuracy(value) -> bool:
    return finite_number(value) and 0.0 <= value <= 1.0


def comparable(summaries: list[dict], run_dirs: list[Path]) -> list[str]:
    """The task names the runs share (in the first run's order). Runs over different task sets, or
    scored on different test files, cannot share one table: refused, naming the first that differs."""
    tasks = summaries[0]["tasks"]
    first_tests = (summaries[0].get("inputs") or {}).get("test") or {}
    for summary, run_dir in zip(summaries[1:], run_dirs[1:]):
        if sorted(summary["tasks"]) != sorted(tasks):
            raise ILoRAError(
                f"{run_dir} ran tasks {summary['tasks']}, {run_dirs[0]} ran {tasks}: "
                "runs over different tasks cannot be compared"
            )
        tests = (summary.get("inputs") or {}).get("test") or {}
        for task in tasks:
            if task in tests and task in first_tests and tests[task] != first_tests[task]:
                raise ILoRAError(
                    f"{run_dir} and {run_dirs[0]} scored task {task!r} on different test files: "
                    "their accuracies cannot be compared"
                )
    return tasks


def final_accuracy(summary: dict, adapter: str, tasks: list[str]) -> list[float]:
    """The last row of an adapter's matrix, in the order of `tasks` (aligned by name, not position)."""
    final = dict(zip(summary["tasks"], summary["matrices"][adapter][-1]))
    return [final[t] for t in tasks]


def comparison_rows(summaries: list[dict]) -> list[tuple[str, dict]]:
    rows = []
    for summary in summaries:
        for adapter, values in summary["metrics"].items():
            rows.append((f"{summary['method']} ({adapter})", values))
    return rows


def comparison_table(summaries: list[dict]) -> str:
    lines = table_head(["method", *METRIC_ORDER])
    for label, values in comparison_rows(summaries):
        lines.append(f"| {label} | " + " | ".join(fmt(values.get(m)) for m in METRIC_ORDER) + " |")
    return "\n".join(lines)


def finals_table(summaries: list[dict], tasks: list[str]) -> str:
    """Each method's final accuracy per task and its wall time, a row per method and adapter."""
    lines = table_head(["method", *tasks, "wall min"])
    for summary in summaries:
        minutes = summary["timings"]["total_seconds"] / 60
        for adapter in summary["matrices"]:
            finals = final_accuracy(summary, adapter, tasks)
            lines.append(
                f"| {summary['method']} ({adapter}) | " + " | ".join(fmt(v) for v in finals) + f" | {minutes:.1f} |"
            )
    return "\n".join(lines)


def compare(run_dirs: list[Path], out_dir: Path) -> str:
    _refuse_repeated_runs(run_dirs)
    summaries = [load_summary(d) for d in run_dirs]
    tasks = comparable(summaries, run_dirs)
    check_directory_target(out_dir, "--out")
    _check_compare_outputs(out_dir)
    table = f"{comparison_table(summaries)}\n\nFinal accuracy per task (%) and wall time:\n\n{finals_table(summaries, tasks)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(f"{COMPARE_TITLE}\n\n{table}\n\n![final accuracy per task](compare.png)\n")
    _compare_plot(out_dir / "compare.png", summaries, tasks)
    return table


COMPARE_TITLE = "# ilora compare"


def _refuse_repeated_runs(run_dirs: list[Path]) -> None:
    """A run given twice (or a copy of it) would stand in the table as two results that agree."""
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        key = Path(run_dir).resolve()
        if key in seen:
            raise ILoRAError(f"{run_dir} is given twice (as {seen[key]}): compare each run once")
        seen[key] = run_dir
    contents: dict[bytes, Path] = {}
    for run_dir in run_dirs:
        metrics = Path(run_dir) / "metrics.json"
        if metrics.is_file():
            content = metrics.read_bytes()
            if content in contents:
                raise ILoRAError(
                    f"{run_dir} and {contents[content]} hold the same run (identical metrics.json): compare each run once"
                )
            contents[content] = run_dir


def _check_compare_outputs(out_dir: Path) -> None:
    """compare.md and compare.png are replaced only when they are an earlier `ilora compare`'s."""
    page, plot = out_dir / "compare.md", out_dir / "compare.png"
    ours = page.is_file() and page.read_text(encoding="utf-8", errors="replace").startswith(COMPARE_TITLE)
    for path in (page, plot):
        if path.exists() and not ours:
            raise ILoRAError(f"{path} exists and was not written by ilora compare; choose another --out")


def _compare_plot(path: Path, summaries: list[dict], tasks: list[str]) -> None:
    labels = [(s, a) for s in summaries for a in s["matrices"]]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.8))
    for j, (summary, adapter) in enumerate(labels):
        final = final_accuracy(summary, adapter, tasks)
        ax.bar(
            [i + j * width for i in range(len(tasks))],
            [100 * v for v in final],
            width,
            label=f"{summary['method']} ({adapter})",
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("final accuracy (%)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def time_table(summaries: list[dict]) -> str:
    """Where the time went: training and evaluation seconds per method, and what it ran on."""
    lines = ["| method | train s | eval s | total s |", "|---|---|---|---|"]
    for summary in summaries:
        per_task = summary["timings"]["per_task"]
        train = sum(t["train_seconds"] for t in per_task)
        evaluate = sum(t["eval_seconds"] for t in per_task)
        lines.append(
            f"| {summary['method']} | {train:.0f} | {evaluate:.0f} | {summary['timings']['total_seconds']:.0f} |"
        )
    hardware = summaries[0].get("hardware")
    if hardware:
        lines.append(
            f"\nOn {hardware['name']} ({hardware['device']}, {hardware['capability']}), {hardware['precision']}."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- seeds
def aggregate(seed_dirs: list[Path], methods: list[str], out_dir: Path) -> str:
    """Mean and standard deviation over seeds of every metric and of each task's final accuracy:
    `summary.md` and `summary.json`."""
    metric_values: dict[str, dict[str, list[float]]] = {}
    final_values: dict[str, dict[str, list[float]]] = {}
    tasks: list[str] = []
    for seed_dir in seed_dirs:
        for summary in (load_summary(seed_dir / m) for m in methods):
            tasks = summary["tasks"]
            for adapter, values in summary["metrics"].items():
                label = f"{summary['method']} ({adapter})"
                for metric in METRIC_ORDER:
                    if values.get(metric) is not None:
                        metric_values.setdefault(label, {}).setdefault(metric, []).append(values[metric])
                for task, accuracy in zip(tasks, summary["matrices"][adapter][-1]):
                    final_values.setdefault(label, {}).setdefault(task, []).append(accuracy)
    result = {"metrics": _mean_sd(metric_values), "final_accuracy": _mean_sd(final_values), "seeds": len(seed_dirs)}
    table = _mean_sd_table(result["metrics"], list(METRIC_ORDER), f"method (mean ± sd, {len(seed_dirs)} seeds)")
    finals = _mean_sd_table(result["final_accuracy"], tasks, "final accuracy per task")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "summary.json", result)
    (out_dir / "summary.md").write_text(f"# ilora benchmark summary\n\n{table}\n\n{finals}\n")
    return f"{table}\n\n{finals}"


def _mean_sd(values: dict[str, dict[str, list[float]]]) -> dict:
    import statistics

    return {
        label: {key: {"mean": statistics.fmean(v), "sd": statistics.pstdev(v), "n": len(v)} for key, v in group.items()}
        for label, group in values.items()
    }


def _mean_sd_table(result: dict, columns: list[str], title: str) -> str:
    lines = table_head([title, *columns])
    for label, group in result.items():
        cells = [f"{fmt(group[c]['mean'])} ± {fmt(group[c]['sd'])}" if c in group else "-" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
