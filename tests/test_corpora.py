import json
from collections import Counter

import pytest

from ilora.data.corpora import TASKS, build_benchmark, normalise


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    tasks = sorted(TASKS)
    return build_benchmark(first, tasks, 60, 30, seed=0), first, build_benchmark(second, tasks, 60, 30, seed=0), second


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_seed_gives_the_same_split(built):
    entries, first, again, second = built
    assert entries == again
    for entry in entries:
        for split in ("train", "test"):
            assert (first / entry[split]).read_text() == (second / entry[split]).read_text()


def test_labels_are_balanced_and_splits_disjoint(built):
    entries, root, _, _ = built
    for entry in entries:
        train, test = read(root / entry["train"]), read(root / entry["test"])
        labels = entry["choices"]
        assert Counter(r["response"] for r in train) == {label: 60 // len(labels) for label in labels}
        assert Counter(r["response"] for r in test) == {label: 30 // len(labels) for label in labels}
        assert not {normalise(r["prompt"]) for r in train} & {normalise(r["prompt"]) for r in test}
        assert all(r["choices"] == labels for r in train + test)


def test_a_different_seed_gives_a_different_split(tmp_path):
    a = build_benchmark(tmp_path / "a", ["reviews"], 20, 10, seed=0)
    build_benchmark(tmp_path / "b", ["reviews"], 20, 10, seed=1)
    assert (tmp_path / "a" / a[0]["train"]).read_text() != (tmp_path / "b" / a[0]["train"]).read_text()


def test_max_chars_cuts_each_text_at_a_word_boundary(tmp_path):
    long = build_benchmark(tmp_path / "long", ["spam"], 20, 10, seed=0)
    short = build_benchmark(tmp_path / "short", ["spam"], 20, 10, seed=0, max_chars=60)
    template = TASKS["spam"].prompt
    prefix, suffix = template.split("{text}")
    for split in ("train", "test"):
        cut = [r["prompt"][len(prefix) : -len(suffix)] for r in read(tmp_path / "short" / short[0][split])]
        whole = [r["prompt"][len(prefix) : -len(suffix)] for r in read(tmp_path / "long" / long[0][split])]
        assert all(len(text) <= 60 + len(" ...") for text in cut)
        assert any(text.endswith(" ...") for text in cut)
        assert all(w.startswith(c.removesuffix(" ...")) for c, w in zip(cut, whole))
