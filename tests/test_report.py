import json

import pytest

from ilora.evaluation.metrics import all_metrics
from ilora.evaluation.report import aggregate, comparison_table, write_report


def summary(method, R, tasks=("a", "b")):
    return {
        "method": method,
        "trains_jointly": method == "joint",
        "tasks": list(tasks),
        "matrices": {"plastic": R},
        "metrics": {"plastic": all_metrics(R)},
        "prediction_distribution": {"plastic": [{t: {"x": 1} for t in tasks} for _ in R]},
        "gold_distribution": {t: {"x": 1} for t in tasks},
        "timings": {"total_seconds": 1.0, "per_task": [{"train_seconds": 0.4, "eval_seconds": 0.1} for _ in tasks]},
    }


def test_aggregate_reports_mean_and_sd_over_seeds(tmp_path):
    matrices = [[[0.5, 0.5], [0.9, 0.5], [0.7, 0.8]], [[0.5, 0.5], [0.9, 0.5], [0.5, 0.6]]]
    for seed, R in enumerate(matrices):
        run = tmp_path / f"seed-{seed}" / "er"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(summary("er", R)))
    table = aggregate([tmp_path / "seed-0", tmp_path / "seed-1"], ["er"], tmp_path)
    result = json.loads((tmp_path / "summary.json").read_text())
    ap = result["metrics"]["er (plastic)"]["AP"]
    assert ap["mean"] == pytest.approx((0.75 + 0.55) / 2) and ap["sd"] == pytest.approx(0.1) and ap["n"] == 2
    bwt = result["metrics"]["er (plastic)"]["BWT"]
    assert bwt["mean"] == pytest.approx((-0.2 + -0.4) / 2)
    assert result["final_accuracy"]["er (plastic)"]["b"]["mean"] == pytest.approx(0.7)
    assert "| er (plastic) | 65.0 ± 10.0 |" in table


def test_report_files_and_comparison_table(tmp_path):
    s = summary("ilora", [[0.5, 0.5], [0.9, 0.5], [0.7, 0.8]])
    write_report(tmp_path, s)
    text = (tmp_path / "report.md").read_text()
    assert "| 1. a | 90.0 | 50.0 |" in text and (tmp_path / "heatmap.png").stat().st_size > 1000
    assert "| ilora (plastic) | 75.0 |" in comparison_table([s])


def test_finals_table_aligns_tasks_by_name_and_shows_wall_time():
    from ilora.evaluation.report import finals_table

    s = summary("ewc", [[0.5, 0.5], [0.9, 0.5], [0.7, 0.8]])
    s["timings"] = {"total_seconds": 90.0, "per_task": []}
    table = finals_table([s], ["b", "a"])  # another run's task order: values follow the names
    assert "| ewc (plastic) | 80.0 | 70.0 | 1.5 |" in table


def test_the_gate_judges_the_released_model_on_general_perplexity_and_task_drops():
    from ilora.evaluation import gate

    two = summary("ilora", [[0.5, 0.5], [0.9, 0.5], [0.7, 0.8]])
    # stable ends level on AP with plastic (0.75): the tie goes to the method's last, stable
    two["matrices"]["stable"] = [[0.5, 0.5], [0.8, 0.5], [0.8, 0.7]]
    two["metrics"]["stable"] = all_metrics(two["matrices"]["stable"])
    two["general"] = {"base": 10.0, "perplexity": {"plastic": [10.2, 12.0], "stable": [10.1, 10.4]}}
    assert gate.released(two) == "stable"
    passed = gate.check(two, general_ppl=0.05, task_drop=5)
    assert passed["model"] == "stable" and passed["breaches"] == []
    assert passed["general_ppl"]["rise"] == pytest.approx(0.04) and passed["task_drop"]["drops"] == {"a": 0.0, "b": 0.0}
    breached = gate.check(two, general_ppl=0.03, task_drop=None)
    assert len(breached["breaches"]) == 1 and "rose 4.0%" in breached["breaches"][0]
    plastic_only = {**two, "metrics": {"plastic": two["metrics"]["plastic"]}}
    dropped = gate.check(plastic_only, general_ppl=None, task_drop=5)
    assert dropped["task_drop"]["drops"]["a"] == pytest.approx(20.0) and "'a'" in dropped["breaches"][0]
