import json

import pytest
import yaml
from tiny import write_jsonl
from transformers import TrainingArguments

from ilora import ILoRATrainer
from ilora.cli import main
from ilora.config.arguments import ContinualArguments, DataArguments, ModelArguments
from ilora.config.parse import Settings
from ilora.evaluation.scoring import subsample
from ilora.pipeline.sequence import joint_settings

LABELS = ["positive", "negative", "neutral"]


def task_rows(task: int, n: int) -> list[dict]:
    words = {0: ["great", "dull", "fine"], 1: ["superb", "boring", "okay"], 2: ["delight", "weak", "plain"]}[task]
    return [
        {"prompt": f"Task {task} review {i}: {words[i % 3]}. Sentiment:", "response": LABELS[i % 3]} for i in range(n)
    ]


@pytest.fixture
def config(tiny_model_dir, tmp_path):
    tasks = []
    for k, name in enumerate(["alpha", "beta", "gamma"]):
        write_jsonl(tmp_path / f"{name}.train.jsonl", task_rows(k, 12))
        write_jsonl(tmp_path / f"{name}.test.jsonl", task_rows(k, 6))
        tasks.append({"name": name, "train": f"{name}.train.jsonl", "test": f"{name}.test.jsonl", "choices": LABELS})
    tasks[2]["scoring"] = "exact_match"
    tasks[2].pop("choices")
    settings = {
        "model_name_or_path": str(tiny_model_dir),
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "output_dir": str(tmp_path / "runs"),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 0.01,
        "ilora_buffer_size": 6,
        "ema_alpha": 0.9,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "max_new_tokens": 3,
        "tasks": tasks,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_three_task_run_writes_matrices_reports_and_resumes(config, tmp_path, monkeypatch):
    assert main(["run", str(config)]) == 0
    run_dir = tmp_path / "runs" / "ilora"
    summary = json.loads((run_dir / "metrics.json").read_text())
    for adapter in ("plastic", "stable"):
        R = summary["matrices"][adapter]
        assert len(R) == 4 and all(len(row) == 3 for row in R)
        assert R[1][2] is None  # after task 1, task 3 is not scored (eval_tasks: seen_and_next)
        assert (
            all(0.0 <= v <= 1.0 for row in R for v in row if v is not None)
            and sum(v is None for row in R for v in row) == 1
        )
        assert set(summary["metrics"][adapter]) == {"AP", "AvgAcc", "BWT", "FWT", "forgetting"}
    assert summary["matrices"]["plastic"][0] == summary["matrices"]["stable"][0]  # row 0: the same base model
    for name in ("report.md", "heatmap.png", "curves.png"):
        assert (run_dir / name).stat().st_size > 0
    assert [p.name for p in sorted((run_dir / "tasks").iterdir())] == ["1-alpha", "2-beta", "3-gamma"]
    manifest = json.loads((run_dir / "tasks" / "3-gamma" / "ilora_task.json").read_text())
    assert manifest["prev_task_id"] == "beta" and manifest["sequence_steps"] == 9

    # a second run trains nothing: every task is finished and evaluated
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("a finished task was retrained"))
    assert main(["run", str(config)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["matrices"] == summary["matrices"]


def test_a_trained_task_whose_evaluation_was_lost_is_evaluated_not_retrained(config, tmp_path, monkeypatch):
    assert main(["run", str(config), "--method", "er"]) == 0
    run_dir = tmp_path / "runs" / "er"
    before = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "tasks" / "2-beta" / "eval.json").unlink()
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("a finished task was retrained"))
    assert main(["run", str(config), "--method", "er"]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["matrices"] == before["matrices"] and list(after["matrices"]) == ["plastic"]


def test_baselines_share_the_harness_and_compare_puts_them_in_one_table(config, tmp_path, capsys):
    for method in ("seq_lora", "joint"):
        assert main(["run", str(config), "--method", method]) == 0
    joint = json.loads((tmp_path / "runs" / "joint" / "metrics.json").read_text())
    assert len(joint["matrices"]["plastic"]) == 2 and set(joint["metrics"]["plastic"]) == {"AP"}
    joint_task = json.loads((tmp_path / "runs" / "joint" / "tasks" / "1-joint" / "ilora_task.json").read_text())
    assert joint_task["global_steps"] == 9  # the sequence's 3 x 3 steps, each on current + replay rows
    assert joint["config"]["training"]["per_device_train_batch_size"] == 8
    seq = json.loads((tmp_path / "runs" / "seq_lora" / "tasks" / "1-alpha" / "ilora_task.json").read_text())
    assert seq["buffer"] is None and list(seq["adapters"]) == ["plastic"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "runs" / "seq_lora"), str(tmp_path / "runs" / "joint")]) == 0
    table = capsys.readouterr().out
    assert "| seq_lora (plastic) |" in table and "| joint (plastic) |" in table
    assert (tmp_path / "runs" / "compare.png").stat().st_size > 0


def test_a_run_directory_is_continued_only_under_its_own_settings(config, tmp_path, monkeypatch, capsys):
    assert main(["run", str(config), "--method", "seq_lora"]) == 0
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "learning_rate": 0.02, "ilora_buffer_size": 3}))
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("trained under changed settings"))
    capsys.readouterr()
    assert main(["run", str(config), "--method", "seq_lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was started with other settings" in err and "learning_rate: 0.01 -> 0.02" in err
    assert "ilora_buffer_size: 6 -> 3" in err and len(err.splitlines()) == 1
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", str(config), "--method", "seq_lora"]) == 0  # the original settings: nothing to train


@pytest.mark.parametrize(
    "training, method, sizes, steps, batch",
    [
        ({}, {}, [399, 400, 17], 50 + 50 + 3, 16),  # replay rows default to the batch size
        ({}, {"ilora_buffer_size": 0}, [399, 400, 17], 103, 8),  # no replay in the sequence: no extra rows
        ({}, {"replay_batch_size": 4}, [16, 16], 4, 12),
        ({"num_train_epochs": 2}, {}, [16, 16], 8, 16),
        ({"max_steps": 5}, {}, [16, 16, 16], 15, 16),
        ({"gradient_accumulation_steps": 2}, {}, [32, 32], 4, 16),
    ],
)
def test_joint_training_gets_the_sequence_steps_with_replay_sized_batches(
    training, method, sizes, steps, batch, tmp_path
):
    training = {"num_train_epochs": 1, **training}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, **training)
    settings = Settings(ModelArguments(), DataArguments(), ContinualArguments(**method), args, {})
    joint = joint_settings(settings, sizes).training
    assert (joint.max_steps, joint.per_device_train_batch_size) == (steps, batch)


def test_eval_command_scores_a_task_directory(config, tmp_path, tiny_model_dir, capsys):
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    task = tmp_path / "runs" / "ilora" / "tasks" / "1-alpha"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(task), "--tasks", str(config)]) == 0
    scores = json.loads(capsys.readouterr().out)
    saved = json.loads((task / "eval.json").read_text())["scores"]
    assert scores["stable"]["alpha"] == saved["stable"]["alpha"]["accuracy"]
    assert set(scores["plastic"]) == {"alpha", "beta", "gamma"}


def test_scoring_only_seen_and_next_tasks_leaves_every_metric_as_scoring_all(config, tmp_path):
    """After task k the default scores tasks 1..k+1: no CL metric reads a cell beyond, so the metrics
    equal those of the full matrix (same training: seq-LoRA, same seed), with fewer test sets scored."""
    settings = yaml.safe_load(config.read_text())
    for scope in ("all", "seen_and_next"):
        config.write_text(yaml.safe_dump({**settings, "eval_tasks": scope, "output_dir": str(tmp_path / scope)}))
        assert main(["run", str(config), "--method", "seq_lora"]) == 0
    full, due = (json.loads((tmp_path / s / "seq_lora" / "metrics.json").read_text()) for s in ("all", "seen_and_next"))
    assert full["metrics"] == due["metrics"] and due["eval_tasks"] == "seen_and_next"
    R_full, R_due = full["matrices"]["plastic"], due["matrices"]["plastic"]
    assert R_due[1] == [R_full[1][0], R_full[1][1], None] and R_due[2:] == R_full[2:] and R_due[0] == R_full[0]
    first = json.loads((tmp_path / "seen_and_next" / "seq_lora" / "tasks" / "1-alpha" / "eval.json").read_text())
    assert set(first["scores"]["plastic"]) == {"alpha", "beta"}
    assert "| 1. alpha | " in (tmp_path / "seen_and_next" / "seq_lora" / "report.md").read_text()


def test_eval_max_rows_scores_the_same_seeded_subsample_after_every_task(config, tmp_path):
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "eval_max_rows": 4}))
    assert main(["run", str(config), "--method", "seq_lora"]) == 0
    run_dir = tmp_path / "runs" / "seq_lora"
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["eval_max_rows"] == 4 and set(summary["test_rows"].values()) == {4}
    picks = [
        json.loads((run_dir / "tasks" / f"{k}-{n}" / "eval.json").read_text())["scores"]["plastic"]["alpha"][
            "predictions"
        ]
        for k, n in ((1, "alpha"), (2, "beta"))
    ]
    assert all(len(p) == 4 for p in picks)
    rows = [{"i": i} for i in range(50)]
    sample = subsample(rows, 7)
    assert sample == subsample(rows, 7) and len(sample) == 7  # fixed: the same rows every time
    assert [r["i"] for r in sample] == sorted(r["i"] for r in sample)  # in file order
    assert subsample(rows, 60) == rows


def test_key_value_overrides_set_any_key_of_the_config(config, tmp_path):
    """`ilora run CONFIG key=value`, as llamafactory-cli takes them: values read as YAML, paths from the
    working directory; no copy of the config needed for another seed or directory."""
    other = tmp_path / "elsewhere"
    argv = ["run", str(config), "--method", "seq_lora", f"output_dir={other}", "learning_rate=0.02", "seed=7"]
    assert main(argv) == 0
    recorded = json.loads((other / "seq_lora" / "metrics.json").read_text())["config"]["training"]
    assert recorded["learning_rate"] == 0.02 and recorded["seed"] == 7
    assert not (tmp_path / "runs" / "seq_lora").exists()


def test_train_takes_a_config_then_overrides_then_flags_each_winning_over_the_one_before(tiny_model_dir, tmp_path):
    from ilora.pipeline.task import parse

    write_jsonl(tmp_path / "d.jsonl", task_rows(0, 4))
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "dataset": "d.jsonl", "output_dir": "o", "seed": 1}))
    settings = parse([str(path), "seed=2", "lora_rank=4", "--seed", "3"])
    assert settings.training.seed == 3 and settings.model.lora_rank == 4
    assert settings.data.dataset == str(tmp_path / "d.jsonl")  # the config's paths: from its directory
    assert {"seed", "lora_rank", "dataset", "model_name_or_path"} <= settings.given


def test_a_finished_run_extended_by_a_task_trains_only_that_task_and_keeps_its_results(config, tmp_path, monkeypatch):
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "tasks": settings["tasks"][:2]}))
    assert main(["run", str(config), "--method", "er"]) == 0
    run_dir = tmp_path / "runs" / "er"
    before = json.loads((run_dir / "metrics.json").read_text())
    trained = []
    original = ILoRATrainer.train
    monkeypatch.setattr(
        ILoRATrainer, "train", lambda self, *a, **k: trained.append(self.args.output_dir) or original(self, *a, **k)
    )
    config.write_text(yaml.safe_dump(settings))  # one more task
    assert main(["run", str(config), "--method", "er"]) == 0
    assert [p.split("/")[-1] for p in trained] == ["3-gamma"]
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["tasks"] == ["alpha", "beta", "gamma"]
    R_before, R_after = before["matrices"]["plastic"], after["matrices"]["plastic"]
    assert [row[:2] for row in R_after[:3]] == R_before  # the earlier cells as they were
    assert R_after[2][2] is not None  # task 2 now scored on the next task too (FWT reads it)
    gamma = json.loads((run_dir / "tasks" / "2-beta" / "eval.json").read_text())["scores"]["plastic"]
    assert set(gamma) == {"alpha", "beta", "gamma"}

    config.write_text(yaml.safe_dump({**settings, "tasks": [settings["tasks"][1], settings["tasks"][0]]}))
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("trained after a reorder"))
    assert main(["run", str(config), "--method", "er"]) == 2  # another order is another experiment
