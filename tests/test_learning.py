"""End to end on a tiny model that actually learns (tiny.LEARNER): a scoring, metric or report error
that only shows once accuracies move away from chance is caught here."""

import json
import statistics

import pytest
import yaml
from tiny import LEARNER, keyword_rows, save_tiny_model, write_jsonl

from ilora.cli import main


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """seq-LoRA on two tasks whose labels conflict: task 2 (beta) flips task 1's (alpha)."""
    root = tmp_path_factory.mktemp("learning")
    save_tiny_model(root / "model", **LEARNER)
    write_jsonl(root / "alpha.train.jsonl", keyword_rows(32))
    write_jsonl(root / "alpha.test.jsonl", keyword_rows(12, offset=200))
    write_jsonl(root / "beta.train.jsonl", keyword_rows(32, flipped=True, offset=50))
    write_jsonl(root / "beta.test.jsonl", keyword_rows(12, flipped=True, offset=300))
    config = {
        "model_name_or_path": "model",
        "output_dir": "runs",
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 6,
        "learning_rate": 0.02,
        "lr_scheduler_type": "constant",
        "bf16": False,  # fp32 on every machine: the thresholds below were measured in fp32
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "tasks": [
            {"name": n, "train": f"{n}.train.jsonl", "test": f"{n}.test.jsonl", "choices": ["positive", "negative"]}
            for n in ("alpha", "beta")
        ],
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(root / "config.yaml"), "--method", "seq_lora"]) == 0
    run = root / "runs" / "seq_lora"
    return root, run, json.loads((run / "metrics.json").read_text())


def test_the_model_learns_each_task_and_forgets_the_first(learned):
    _, _, summary = learned
    R = summary["matrices"]["plastic"]
    assert R[1][0] >= 0.8, R  # alpha learned
    assert R[2][1] >= 0.8, R  # beta learned
    assert R[2][0] <= 0.5, R  # alpha forgotten: beta taught the opposite labels


def test_metrics_are_those_of_the_matrix(learned):
    _, _, summary = learned
    R, values = summary["matrices"]["plastic"], summary["metrics"]["plastic"]
    assert values["AP"] == pytest.approx(statistics.fmean(R[2]))
    assert values["AvgAcc"] == pytest.approx((R[1][0] + (R[2][0] + R[2][1]) / 2) / 2)
    assert values["BWT"] == pytest.approx(R[2][0] - R[1][0]) and values["BWT"] < -0.3
    assert values["forgetting"] == pytest.approx(R[1][0] - R[2][0])
    assert values["FWT"] == pytest.approx(R[1][1] - R[0][1])


def test_accuracy_is_recounted_from_the_predictions_and_the_test_files(learned):
    root, run, summary = learned
    for k, task in enumerate(("alpha", "beta"), start=1):
        saved = json.loads((run / "tasks" / f"{k}-{task}" / "eval.json").read_text())["scores"]["plastic"]
        for name in ("alpha", "beta"):
            gold = [json.loads(line)["response"] for line in (root / f"{name}.test.jsonl").read_text().splitlines()]
            predictions = saved[name]["predictions"]
            assert len(predictions) == len(gold)
            recount = sum(p == g for p, g in zip(predictions, gold)) / len(gold)
            assert (
                recount == saved[name]["accuracy"] == summary["matrices"]["plastic"][k][["alpha", "beta"].index(name)]
            )


def test_the_report_shows_the_measured_numbers(learned):
    _, run, summary = learned
    report = (run / "report.md").read_text()
    R, values = summary["matrices"]["plastic"], summary["metrics"]["plastic"]
    assert f"| 2. beta | {100 * R[2][0]:.1f} | {100 * R[2][1]:.1f} |" in report
    assert f"{100 * values['BWT']:.1f}" in report and "nan" not in report.lower()


def test_a_forgetting_gate_passes_or_stops_a_release_without_retraining(learned, monkeypatch, capsys):
    """The run forgot alpha (its accuracy fell by at least 30 points): a 5-point gate is breached, exit code 3,
    while metrics.json and report.md are written and say so; a 100-point gate passes. Changing the gate
    re-judges the finished run without retraining it."""
    from ilora import ILoRATrainer
    from ilora.errors import EXIT_GATE

    root, run, _ = learned
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("a finished task was retrained"))
    config = root / "config.yaml"
    capsys.readouterr()
    assert main(["run", str(config), "--method", "seq_lora", "gate_task_drop=5"]) == EXIT_GATE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forgetting gate breached" in err and "'alpha'" in err, err
    summary = json.loads((run / "metrics.json").read_text())
    gate = summary["gate"]
    assert gate["model"] == "plastic" and gate["task_drop"]["drops"]["alpha"] >= 30 and gate["breaches"]
    assert gate["task_drop"]["drops"]["beta"] == 0.0  # the last task cannot have dropped yet
    assert "**BREACHED**" in (run / "report.md").read_text()
    assert main(["run", str(config), "--method", "seq_lora", "gate_task_drop=100"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["gate"]["breaches"] == [] and "passed" in (run / "report.md").read_text()
