"""The tables of `ilora benchmark`: per task order, every method's AP, BWT, FWT and forgetting as mean
± sd over seeds, its paired per-seed difference to I-LoRA's stable adapter, each task's final accuracy,
the perplexity on the general text after the last task, and what it cost (training and evaluation time, seconds per
optimizer step, peak resident memory, trained parameters, bytes stored per task, rows replayed); a
picture of AP and BWT with the spread over seeds. `table.md`, `table.json`, `table-order-<o>.png`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ilora.core.adapters import ADAPTER_CONFIG
from ilora.evaluation.report import load_summary, table_head
from ilora.files import read_json, write_json
from ilora.store import taskdir
from ilora.store.state import BUFFER_DIR, METHOD_STATE

METRICS = ("AP", "BWT", "FWT", "forgetting")
REFERENCE = ("ilora", "stable")  # what every other row is paired with
COSTS = (
    "train_eval_s",
    "s_per_step",
    "peak_rss_mb",
    "trained_params",
    "adapter_kb",
    "buffer_kb",
    "state_kb",
    "replayed",
)


def write(
    root: Path, plan, methods: list[str], seeds: list[int], orders: list[int], tuned: dict, missing_ok: bool = False
) -> str:
    """The tables and pictures of the finished runs (`missing_ok`: of those finished so far)."""
    results = {order: collect(root / f"order-{order}", methods, seeds, missing_ok) for order in orders}
    page = [f"# {plan.name}: {_count(len(methods), 'method')} x {_count(len(seeds), 'seed')}", ""]
    page += _intro(seeds, tuned)
    for order, rows in results.items():
        page += [f"## Order {order}: {' → '.join(plan.orders[order])}", ""]
        page += [*main_table(rows), "", "Final accuracy per task (%):", "", *finals_table(rows, plan.orders[order])]
        page += ["", "What it cost (mean over seeds):", "", *cost_table(rows), ""]
        page += [f"![AP and BWT, order {order}](table-order-{order}.png)", ""]
        _plot(root / f"table-order-{order}.png", rows, f"{plan.name}, order {order}, {_count(len(seeds), 'seed')}")
    write_json(root / "table.json", {"seeds": seeds, "tuned": tuned, "orders": {str(o): r for o, r in results.items()}})
    text = "\n".join(page)
    (root / "table.md").write_text(text + "\n")
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _intro(seeds: list[int], tuned: dict) -> list[str]:
    lines = [
        f"Seeds {', '.join(map(str, seeds))}. Metrics in percent (BWT, FWT, forgetting and Δ in points), "
        "mean ± sample standard deviation over seeds; Δ AP is each row's AP minus I-LoRA's (stable) on the "
        "same seed, averaged over seeds (± its sd): positive means ahead of I-LoRA.",
        "",
    ]
    for source in dict.fromkeys(t.get("tuned_in", "") for t in tuned.values()):
        chosen = ", ".join(
            f"{m}: {t['option']} = {t['value']}" for m, t in tuned.items() if t.get("tuned_in", "") == source
        )
        where = f"(order 1, seed 0) of another benchmark, {source}" if source else "(order 1, seed 0)"
        lines += [f"Tuned on the validation split {where}: {chosen}.", ""]
    if not tuned:
        lines += ["Every method at the benchmark's settings (no tuning run).", ""]
    return lines


# ------------------------------------------------------------------ collecting
def collect(order_dir: Path, methods: list[str], seeds: list[int], missing_ok: bool = False) -> dict[str, dict]:
    """Per row ("method (adapter)"): each seed's metrics, final accuracies, general perplexity and costs.
    `missing_ok`: leave out the runs not finished yet (else a missing run is an error)."""
    rows: dict[str, dict] = {}
    for method in methods:
        for seed in seeds:
            run_dir = order_dir / f"seed-{seed}" / method
            if missing_ok and not (run_dir / "metrics.json").is_file():
                continue  # a benchmark still running: the table names the seeds each row holds
            summary = load_summary(run_dir)
            cost = run_cost(run_dir, summary)
            for adapter, values in summary["metrics"].items():
                row = rows.setdefault(f"{method} ({adapter})", {"method": method, "adapter": adapter, "seeds": {}})
                row["seeds"][str(seed)] = {
                    "metrics": {m: values.get(m) for m in METRICS},
                    "final": dict(zip(summary["tasks"], summary["matrices"][adapter][-1])),
                    "general_ppl": _final_perplexity(summary, adapter),
                    "cost": cost,
                }
    return rows


def _final_perplexity(summary: dict, adapter: str) -> float | None:
    general = summary.get("general") or {}
    values = (general.get("perplexity") or {}).get(adapter)
    return values[-1] if values else None


def run_cost(run_dir: Path, summary: dict) -> dict:
    """What one run cost, from its summary (each task's training and evaluation seconds, whichever
    sitting ran it), its task manifests and directories, and the runner's cost.json (peak memory)."""
    tasks = sorted(p for p in (run_dir / "tasks").iterdir() if taskdir.is_finished(p))
    manifests = [taskdir.read_manifest(p) for p in tasks]
    steps = sum(m["global_steps"] for m in manifests)
    train = sum(m["train_seconds"] or 0.0 for m in manifests)
    sizes = [_task_bytes(p) for p in tasks]
    recorded = read_json(run_dir / "cost.json", "benchmark cost record") if (run_dir / "cost.json").is_file() else {}
    return {
        "train_eval_s": sum(t["train_seconds"] + t["eval_seconds"] for t in summary["timings"]["per_task"]),
        "s_per_step": train / steps if steps else None,
        "peak_rss_mb": recorded.get("peak_rss_mb"),
        "trained_params": manifests[-1].get("trainable_parameters"),
        **{key: statistics.fmean(s[key] for s in sizes) / 1024 for key in ("adapter_kb", "buffer_kb", "state_kb")},
        "replayed": sum(m.get("rows_replayed", 0) for m in manifests),
    }


def _task_bytes(task_dir: Path) -> dict[str, float]:
    """A task directory's bytes: its adapters (every PEFT directory in it), its replay buffer, and the
    method's state."""
    files = [p for p in task_dir.rglob("*") if p.is_file()]
    adapters = sum(p.stat().st_size for p in files if (p.parent / ADAPTER_CONFIG).is_file())
    buffer = sum(p.stat().st_size for p in files if p.relative_to(task_dir).parts[0] == BUFFER_DIR)
    state = sum(p.stat().st_size for p in files if p.name == METHOD_STATE)
    return {"adapter_kb": float(adapters), "buffer_kb": float(buffer), "state_kb": float(state)}


# ------------------------------------------------------------------ tables
def mean_sd(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.fmean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def _per_seed(row: dict, pick) -> list[float]:
    return [v for v in (pick(s) for s in row["seeds"].values()) if v is not None]


def paired_difference(row: dict, reference: dict | None) -> list[float]:
    """Per seed present in both: this row's AP minus the reference's."""
    if reference is None:
        return []
    return [
        row["seeds"][seed]["metrics"]["AP"] - reference["seeds"][seed]["metrics"]["AP"]
        for seed in row["seeds"]
        if seed in reference["seeds"]
    ]


def main_table(rows: dict[str, dict]) -> list[str]:
    reference = rows.get(f"{REFERENCE[0]} ({REFERENCE[1]})")
    lines = table_head(["method (adapter)", *METRICS, "Δ AP vs I-LoRA", "general ppl"])
    most = max((len(row["seeds"]) for row in rows.values()), default=0)
    for label, row in rows.items():
        if len(row["seeds"]) < most:  # a run not finished yet: say which seeds the row holds
            label = f"{label}, seeds {', '.join(row['seeds'])} only"
        cells = [mean_sd(_per_seed(row, lambda s, m=m: s["metrics"][m])) for m in METRICS]
        delta = "-" if row is reference else mean_sd(paired_difference(row, reference))
        ppl = mean_sd(_per_seed(row, lambda s: s["general_ppl"]), scale=1.0)
        lines.append(f"| {label} | " + " | ".join([*cells, delta, ppl]) + " |")
    return lines


def finals_table(rows: dict[str, dict], tasks) -> list[str]:
    lines = table_head(["method (adapter)", *tasks])
    for label, row in rows.items():
        cells = [mean_sd(_per_seed(row, lambda s, t=t: s["final"].get(t))) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def cost_table(rows: dict[str, dict]) -> list[str]:
    head = ["method", "train + eval s", "s / step", "peak RSS MB", "trained params", "adapters kB / task"]
    lines = table_head([*head, "buffer kB / task", "state kB / task", "rows replayed"])
    done = set()
    for row in rows.values():
        if row["method"] in done:  # one run serves every adapter of a method
            continue
        done.add(row["method"])
        means = {}
        for key in COSTS:
            values = _per_seed(row, lambda s, k=key: s["cost"].get(k))
            means[key] = statistics.fmean(values) if values else None
        cells = [
            _number(means["train_eval_s"], "{:.0f}"),
            _number(means["s_per_step"], "{:.2f}"),
            _number(means["peak_rss_mb"], "{:.0f}"),
            _number(means["trained_params"], "{:,.0f}"),
            _number(means["adapter_kb"], "{:.0f}"),
            _number(means["buffer_kb"], "{:.0f}"),
            _number(means["state_kb"], "{:.0f}"),
            _number(means["replayed"], "{:.0f}"),
        ]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return lines


def _number(value, form: str) -> str:
    return "-" if value is None else form.format(value)


def _plot(path: Path, rows: dict[str, dict], title: str) -> None:
    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.7 * len(labels), 4.2))
    for ax, metric in zip(axes, ("AP", "BWT")):
        values = [[100 * v for v in _per_seed(rows[label], lambda s, m=metric: s["metrics"][m])] for label in labels]
        means = [statistics.fmean(v) if v else 0.0 for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(range(len(labels)), means, yerr=spread, capsize=3, color="tab:blue" if metric == "AP" else "tab:orange")
        for i, seed_values in enumerate(values):  # every seed as a dot: the spread is visible, not only its sd
            ax.plot([i] * len(seed_values), seed_values, "k.", markersize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} (%)" if metric == "AP" else f"{metric} (points)")
        ax.axhline(0, color="grey", linewidth=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
