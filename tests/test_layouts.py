"""The standard benchmarks' layouts, written by the tests in exactly the published form, expand to the
right tasks, choices and scorings in the right order; generation scorings use the maintained libraries."""

import json

import pytest
import yaml

from ilora import ILoRAError
from ilora.cli import main
from ilora.config.parse import parse_run_config
from ilora.data.layouts import CL_FOLDERS, ORDERS
from ilora.evaluation.scoring import generation_scores

LABELS = {
    "dbpedia": ["Company", "Artist"],
    "amazon": ["positive", "negative"],
    "yahoo": ["Sports", "Health"],
    "ag": ["World", "Business"],
}


def cl_benchmark(root, names):
    """O-LoRA's CL_Benchmark: <category>/<task>/{train,dev,test}.json as lists of {label, sentence}, labels.json."""
    for name in names:
        folder = root / CL_FOLDERS[name]
        folder.mkdir(parents=True)
        labels = LABELS.get(name, ["yes", "no"])
        rows = [{"label": labels[i % 2], "sentence": f"{name} sentence {i} about {labels[i % 2]}"} for i in range(6)]
        for split in ("train", "dev", "test"):
            (folder / f"{split}.json").write_text(json.dumps(rows))
        (folder / "labels.json").write_text(json.dumps(labels))
    return root


def trace_benchmark(root):
    for name in ORDERS["trace"][1]:
        (root / name).mkdir(parents=True)
        rows = [{"prompt": f"{name} question {i}", "answer": f"answer {i}"} for i in range(4)]
        for split in ("train", "eval", "test"):
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    return root


def run_config(tmp_path, model_dir, **entries):
    config = {
        "model_name_or_path": str(model_dir),
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "ilora_buffer_size": 4,
        "output_dir": str(tmp_path / "out"),
        "max_new_tokens": 4,
        **entries,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("order", [1, 2, 3])
def test_standard_cl_orders_expand_with_labels_as_choices(order, tmp_path, tiny_model_dir):
    cl_benchmark(tmp_path / "CL_Benchmark", ORDERS["standard_cl"][1])
    config = run_config(tmp_path, tiny_model_dir, benchmark="standard_cl", data_dir="CL_Benchmark", order=order)
    run = parse_run_config(config).run
    assert [t.name for t in run.tasks] == ORDERS["standard_cl"][order]
    for task in run.tasks:
        assert task.scoring == "choice" and task.choices == LABELS[task.name]
        assert task.test.endswith(f"{CL_FOLDERS[task.name]}/test.json")


@pytest.mark.parametrize("order", [4, 5, 6])
def test_long_sequence_orders_have_fifteen_tasks_in_the_papers_order(order, tmp_path, tiny_model_dir):
    cl_benchmark(tmp_path / "CL", CL_FOLDERS)
    config = run_config(tmp_path, tiny_model_dir, benchmark="long_sequence", data_dir="CL", order=order)
    run = parse_run_config(config).run
    names = [t.name for t in run.tasks]
    assert len(names) == 15 and len(set(names)) == 15 and names == ORDERS["long_sequence"][order]
    assert names[0] == {4: "mnli", 5: "multirc", 6: "yelp"}[order]


def test_standard_cl_runs_end_to_end_on_the_published_layout(tmp_path, tiny_model_dir):
    cl_benchmark(tmp_path / "CL_Benchmark", ORDERS["standard_cl"][1])
    config = run_config(tmp_path, tiny_model_dir, benchmark="standard_cl", data_dir="CL_Benchmark", order=2)
    assert main(["run", str(config), "--method", "er"]) == 0
    summary = json.loads((tmp_path / "out" / "er" / "metrics.json").read_text())
    assert summary["tasks"] == ORDERS["standard_cl"][2] and summary["test_rows"]["ag"] == 6
    assert set(summary["prediction_distribution"]["plastic"][-1]["ag"]) <= {"World", "Business"}


def test_trace_expands_in_order_with_its_scorings_and_runs(tmp_path, tiny_model_dir):
    trace_benchmark(tmp_path / "TRACE")
    config = run_config(tmp_path, tiny_model_dir, benchmark="trace", data_dir="TRACE")
    run = parse_run_config(config).run
    assert [t.name for t in run.tasks] == [
        "C-STANCE",
        "FOMC",
        "MeetingBank",
        "Py150",
        "ScienceQA",
        "NumGLUE-cm",
        "NumGLUE-ds",
        "20Minuten",
    ]
    scorings = {t.name: t.scoring for t in run.tasks}
    assert scorings["MeetingBank"] == scorings["20Minuten"] == "rouge_l" and scorings["Py150"] == "edit_similarity"
    assert scorings["FOMC"] == "exact_match"
    assert main(["run", str(config), "--method", "seq_lora"]) == 0
    R = json.loads((tmp_path / "out" / "seq_lora" / "metrics.json").read_text())["matrices"]["plastic"]
    assert len(R) == 9 and all(0.0 <= v <= 1.0 for row in R for v in row if v is not None)
    assert all(v is not None for v in R[0] + R[-1]) and R[1][2] is None  # seen_and_next: task 3 waits for task 2


def test_generation_scores_come_from_the_metric_libraries():
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer

    preds, refs = (
        ["Die Stadt plant Parks", "def f(x): return x"],
        ["die stadt plant grössere parks", "def f(y): return y"],
    )
    assert generation_scores("exact_match", ["A b.", "c"], ["a b", "d"]) == [1.0, 0.0]
    rouge = generation_scores("rouge_l", preds, refs)
    assert rouge[0] == pytest.approx(2 * 4 / (4 + 5))  # LCS of 4 words; non-ASCII words count
    english = rouge_scorer.RougeScorer(["rougeL"]).score("the cat sat", "the cat sat down")["rougeL"].fmeasure
    assert generation_scores("rouge_l", ["the cat sat down"], ["the cat sat"])[0] == pytest.approx(english)
    assert generation_scores("edit_similarity", preds, refs)[1] == pytest.approx(fuzz.ratio(preds[1], refs[1]) / 100)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"benchmark": "standard", "data_dir": "CL"}, "did you mean 'standard_cl'"),
        ({"benchmark": "standard_cl", "data_dir": "CL", "order": 4}, r"order 4 is not one of \[1, 2, 3\]"),
        ({"benchmark": "standard_cl"}, "needs data_dir"),
        ({"benchmark": "trace", "data_dir": "CL"}, "C-STANCE/train.json: missing"),
    ],
)
def test_benchmark_refusals_name_the_culprit(entries, message, tmp_path, tiny_model_dir):
    cl_benchmark(tmp_path / "CL", ORDERS["standard_cl"][1])
    with pytest.raises(ILoRAError, match=message):
        parse_run_config(run_config(tmp_path, tiny_model_dir, **entries))
