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
