"""`ilora benchmark` on the tiny model, with the data step on wheels of the real layout
(`real_text_fixtures`) and real4 shrunk: every (order, seed, method) runs as its own `ilora run`, the
table's figures are the runs' own, tuning picks by validation AP, and a killed benchmark continues."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from real_text_fixtures import write_wheels

from ilora.data import real_text
from ilora.errors import ILoRAError
from ilora.evaluation import benchmark_report
from ilora.pipeline import benchmark

SMALL = {"n_train": 16, "n_val": 8, "n_test": 8}


@pytest.fixture
def small_real4(monkeypatch):
    monkeypatch.setitem(real_text.BENCHMARKS, "real4", replace(real_text.BENCHMARKS["real4"], **SMALL))


def overrides(model_dir):
    return {"model_name_or_path": str(model_dir), "learning_rate": 0.01, "bf16": False, "ilora_buffer_size": 6}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    return write_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def finished(tiny_model_dir, wheels, tmp_path_factory):
    """er and ilora, seeds 0 and 1, order 2 (a run of the small real4, made once for the module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(real_text.BENCHMARKS, "real4", replace(real_text.BENCHMARKS["real4"], **SMALL))
        root = tmp_path_factory.mktemp("bench")
        text = benchmark.run_benchmark(
            "real4", root, ["er", "ilora"], [0, 1], [2], False, overrides(tiny_model_dir), wheels
        )
    return root, text


def metrics(root, seed, method, order=2):
    return json.loads((root / f"order-{order}" / f"seed-{seed}" / method / "metrics.json").read_text())


def test_the_table_holds_each_runs_own_figures(finished):
    root, text = finished
    table = json.loads((root / "table.json").read_text())["orders"]["2"]
    assert set(table) == {"er (plastic)", "ilora (plastic)", "ilora (stable)"}
    for row in table.values():
        method, adapter = row["method"], row["adapter"]
        for seed in (0, 1):
            run = metrics(root, seed, method)
            assert row["seeds"][str(seed)]["metrics"]["AP"] == run["metrics"][adapter]["AP"]
            assert row["seeds"][str(seed)]["general_ppl"] == run["general"]["perplexity"][adapter][-1]
            assert list(row["seeds"][str(seed)]["final"].values()) == run["matrices"][adapter][-1]
    assert "## Order 2: trec → amazon → reuters → newsgroups" in text
    assert (root / "table-order-2.png").stat().st_size > 0 and (root / "table.md").read_text().strip() == text.strip()


def test_the_difference_to_ilora_is_paired_by_seed(finished):
    root, text = finished
    differences = [
        metrics(root, s, "er")["metrics"]["plastic"]["AP"] - metrics(root, s, "ilora")["metrics"]["stable"]["AP"]
        for s in (0, 1)
    ]
    table = json.loads((root / "table.json").read_text())["orders"]["2"]
    assert benchmark_report.paired_difference(table["er (plastic)"], table["ilora (stable)"]) == differences
    er_row = next(line for line in text.splitlines() if line.startswith("| er (plastic) |"))
    assert benchmark_report.mean_sd(differences) in er_row


def test_the_costs_come_from_the_runs(finished):
    root, _ = finished
    table = json.loads((root / "table.json").read_text())["orders"]["2"]
    for method in ("er", "ilora"):
        cost = table[f"{method} (plastic)"]["seeds"]["0"]["cost"]
        tasks = sorted((root / "order-2" / "seed-0" / method / "tasks").iterdir())
        manifests = [json.loads((t / "ilora_task.json").read_text()) for t in tasks]
        assert cost["replayed"] == sum(m["rows_replayed"] for m in manifests) > 0
        assert cost["trained_params"] == manifests[-1]["trainable_parameters"] > 0
        timings = json.loads((root / "order-2" / "seed-0" / method / "metrics.json").read_text())["timings"]["per_task"]
        assert cost["train_eval_s"] == sum(t["train_seconds"] + t["eval_seconds"] for t in timings)
        assert cost["peak_rss_mb"] > 100 and cost["s_per_step"] > 0
        assert cost["buffer_kb"] > 0 and cost["adapter_kb"] > 0
    # I-LoRA writes two adapters per task, ER one
    ilora, er = (table[f"{m} (plastic)"]["seeds"]["0"]["cost"]["adapter_kb"] for m in ("ilora", "er"))
    assert ilora == pytest.approx(2 * er, rel=0.05)


def test_the_scored_runs_train_on_train_rows_and_score_the_test_split(finished):
    root, _ = finished
    config = (root / "order-2" / "seed-0" / "config.yaml").read_text()
    assert ".test.jsonl" in config and ".val.jsonl" not in config
    assert "wikitext-2.test.txt" in config


def test_tuning_picks_the_best_validation_ap_and_the_runs_use_it(
    tiny_model_dir, wheels, tmp_path, small_real4, monkeypatch
):
    monkeypatch.setattr(benchmark, "GRID", {"er": ("replay_batch_size", [1, 2]), "ewc": ("ewc_lambda", [1.0, 100.0])})
    # A second benchmark command tuning another method in the same directory finishes meanwhile.
    theirs = {"option": "ewc_lambda", "value": 100.0, "validation_ap": {"1.0": 50.0, "100.0": 60.0}}
    run_method = benchmark.run_method

    def run_beside_another_command(*args):
        run_method(*args)
        if not (tmp_path / "tuned.json").exists():  # during the first tuning run
            (tmp_path / "tuned.json").write_text(json.dumps({"ewc": theirs}))

    monkeypatch.setattr(benchmark, "run_method", run_beside_another_command)
    benchmark.run_benchmark("real4", tmp_path, ["er"], [0], [1], True, overrides(tiny_model_dir), wheels)
    assert json.loads((tmp_path / "tuned.json").read_text())["ewc"] == theirs
    tuned = json.loads((tmp_path / "tuned.json").read_text())["er"]
    tuning = tmp_path / "tuning" / "er"
    searched = {
        str(v): json.loads((tuning / f"replay_batch_size={v}" / "er" / "metrics.json").read_text())["metrics"][
            "plastic"
        ]["AP"]
        for v in (1, 2)
    }
    assert tuned["validation_ap"] == searched
    assert tuned["value"] == max((1, 2), key=lambda v: searched[str(v)])
    assert ".val.jsonl" in (tmp_path / "tuning" / "er" / "config.yaml").read_text()
    manifest = json.loads(
        next((tmp_path / "order-1" / "seed-0" / "er" / "tasks").glob("4-*/ilora_task.json")).read_text()
    )
    assert manifest["continual_args"]["replay_batch_size"] == tuned["value"]


def test_a_killed_benchmark_continues_where_it_stopped(tiny_model_dir, wheels, tmp_path):
    script = (
        "import sys; from dataclasses import replace; from pathlib import Path\n"
        "from ilora.data import real_text; from ilora.pipeline import benchmark\n"
        f"real_text.BENCHMARKS['real4'] = replace(real_text.BENCHMARKS['real4'], **{SMALL!r})\n"
        f"benchmark.run_benchmark('real4', Path(sys.argv[1]), ['ilora'], [0], [1], False, {overrides(tiny_model_dir)!r}, Path(sys.argv[2]))\n"
    )
    first_task = tmp_path / "order-1" / "seed-0" / "ilora" / "tasks" / "1-reuters" / "ilora_task.json"
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(wheels)], start_new_session=True)
    deadline = time.time() + 300
    while not first_task.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_task.is_file(), "the first task never finished"
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its `ilora run`, as a terminal's kill would
    process.wait()
    finished_at = json.loads(first_task.read_text())["finished_at"]
    assert not (tmp_path / "table.md").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(real_text.BENCHMARKS, "real4", replace(real_text.BENCHMARKS["real4"], **SMALL))
        benchmark.run_benchmark("real4", tmp_path, ["ilora"], [0], [1], False, overrides(tiny_model_dir), wheels)
    assert json.loads(first_task.read_text())["finished_at"] == finished_at  # not trained again
    assert len(metrics(tmp_path, 0, "ilora", order=1)["tasks"]) == 4
    assert "ilora (stable)" in (tmp_path / "table.md").read_text()


def test_another_benchmarks_directory_and_unknown_choices_are_refused(tmp_path, wheels):
    (tmp_path / "mine.txt").write_text("user's")
    with pytest.raises(ILoRAError, match="not an ilora benchmark's"):
        benchmark.run_benchmark("real4", tmp_path, ["er"], [0], [1], cache=wheels)
    assert (tmp_path / "mine.txt").read_text() == "user's"
    with pytest.raises(ILoRAError, match=r"real4 has orders \[1, 2, 3\], not \[4\]"):
        benchmark.run_benchmark("real4", tmp_path / "new", ["er"], [0], [4], cache=wheels)
    with pytest.raises(ILoRAError, match="method 'err' is not one of"):
        benchmark.run_benchmark("real4", tmp_path / "new", ["err"], [0], [1], cache=wheels)
    with pytest.raises(ILoRAError, match="--seeds 0 0: a value is given twice"):
        benchmark.run_benchmark("real4", tmp_path / "new", ["er"], [0, 0], [1], cache=wheels)
    with pytest.raises(ILoRAError, match="output_dir, seed: set by the benchmark for each run"):
        benchmark.run_benchmark(
            "real4", tmp_path / "new", ["er"], [0], [1], False, {"seed": 3, "output_dir": "x"}, wheels
        )
    assert not (tmp_path / "new").exists()
    Path(tmp_path / "other").mkdir()
    benchmark.build_data("real_long", tmp_path / "other", wheels)
    with pytest.raises(ILoRAError, match="holds the benchmark 'real_long', not 'real4'"):
        benchmark.build_data("real4", tmp_path / "other", wheels)


def test_a_table_of_a_benchmark_still_running_names_the_seeds_of_each_row(finished, tmp_path):
    root, _ = finished
    shutil.copytree(root / "order-2", tmp_path / "order-2")
    (tmp_path / "order-2" / "seed-1" / "er" / "metrics.json").unlink()  # not finished yet
    with pytest.raises(ILoRAError, match="no metrics.json"):
        benchmark_report.collect(tmp_path / "order-2", ["er", "ilora"], [0, 1])
    rows = benchmark_report.collect(tmp_path / "order-2", ["er", "ilora"], [0, 1], missing_ok=True)
    assert list(rows["er (plastic)"]["seeds"]) == ["0"] and list(rows["ilora (stable)"]["seeds"]) == ["0", "1"]
    table = "\n".join(benchmark_report.main_table(rows))
    assert "| er (plastic), seeds 0 only |" in table and "| ilora (stable) |" in table


@pytest.mark.parametrize(
    "record",
    [
        "[1, 2]",
        '{"er": 8}',
        '{"er": {"value": 8}}',
        '{"er": {"option": "output_dir", "value": 8}}',  # would move every scored run
        '{"sgd": {"option": "replay_batch_size", "value": 8}}',
        '{"er": {"option": "replay_batch_size", "value": NaN}}',
        '{"er": {"option": "replay_batch_size", "value": "8"}}',
    ],
)
def test_a_damaged_tuning_record_is_one_line_and_left_alone(tmp_path, record):
    (tmp_path / "tuned.json").write_text(record)
    with pytest.raises(ILoRAError, match="tuned.json: damaged tuning record .*; delete it to tune again"):
        benchmark._read_tuned(tmp_path)
    with pytest.raises(
        ILoRAError,
        match=r"tuned.json: damaged tuning record \(each method of the grid needs its option and a number\)$",
    ):
        benchmark._borrow_tuned(tmp_path / "tuned.json", tmp_path / "other", tune=False)
    assert (tmp_path / "tuned.json").read_text() == record


def test_values_tuned_in_another_benchmark_are_used_and_named(tiny_model_dir, wheels, tmp_path, small_real4, capsys):
    from ilora.cli import main

    source = tmp_path / "real4" / "tuned.json"
    source.parent.mkdir()
    source.write_text(json.dumps({"er": {"option": "replay_batch_size", "value": 1, "validation_ap": {"1": 0.5}}}))
    target = tmp_path / "other"
    assert main(["benchmark", "real4", "--tune", "--tuned_from", str(source), "--output_dir", str(target)]) == 2
    assert "--tune and --tuned_from" in capsys.readouterr().err and not target.exists()

    text = benchmark.run_benchmark(
        "real4", target, ["er"], [0], [1], False, overrides(tiny_model_dir), wheels, tuned_from=source.parent
    )
    manifest = json.loads(
        next((target / "order-1" / "seed-0" / "er" / "tasks").glob("4-*/ilora_task.json")).read_text()
    )
    assert manifest["continual_args"]["replay_batch_size"] == 1
    record = (target / "tuned.json").read_text()
    assert json.loads(record)["er"]["tuned_in"] == str(source.resolve())
    assert f"another benchmark, {source.resolve()}: er: replay_batch_size = 1" in text

    # The source chose again: this benchmark's runs used the old value, so the new one is refused.
    source.write_text(json.dumps({"er": {"option": "replay_batch_size", "value": 2}}))
    with pytest.raises(ILoRAError, match="already chose other values for er"):
        benchmark.run_benchmark("real4", target, ["er"], [0], [1], False, overrides(tiny_model_dir), wheels, source)
    assert (target / "tuned.json").read_text() == record
