"""The field's standard continual-learning benchmarks, from their published file layouts.

The data cannot be downloaded here; a run config names where it is and which order to train in:

    benchmark: standard_cl        # or long_sequence, trace
    data_dir: CL_Benchmark        # the folder as the benchmark publishes it
    order: 1                      # standard_cl: 1-3; long_sequence: 4-6; trace: 1

- `standard_cl` and `long_sequence`: O-LoRA's `CL_Benchmark/` (one folder per task under its category,
  `train.json` / `dev.json` / `test.json`, each a JSON list of {"label", "sentence"}, and `labels.json`),
  in the orders of the O-LoRA paper (Wang et al. 2023, Table 7; from Razdaibiedina et al. 2023), scored
  by ranking the labels of `labels.json`.
- `trace`: TRACE's layout (one folder per task, `train.json` / `eval.json` / `test.json`, each a JSON list of
  {"prompt", "answer"}), in the TRACE paper's order, scored as TRACE scores each task: exact match,
  ROUGE-L for MeetingBank and 20Minuten (TRACE reports SARI for 20Minuten; no maintained SARI library
  installs offline, so ROUGE-L stands in, and says so), edit similarity for Py150.
"""

from __future__ import annotations

import json
from pathlib import Path

from ilora.errors import ILoRAError, did_you_mean

BENCHMARKS = ("standard_cl", "long_sequence", "trace")

# O-LoRA's CL_Benchmark folders, by the task names its paper's orders use
CL_FOLDERS = {
    "dbpedia": "TC/dbpedia",
    "amazon": "SC/amazon",
    "yahoo": "TC/yahoo",
    "ag": "TC/agnews",
    "mnli": "NLI/MNLI",
    "cb": "NLI/CB",
    "wic": "WiC/WiC",
    "copa": "COPA/COPA",
    "qqp": "QQP/QQP",
    "boolqa": "BoolQA/BoolQA",
    "rte": "NLI/RTE",
    "imdb": "SC/IMDB",
    "yelp": "SC/yelp",
    "sst-2": "SC/SST-2",
    "multirc": "MultiRC/MultiRC",
}
ORDERS = {
    "standard_cl": {
        1: ["dbpedia", "amazon", "yahoo", "ag"],
        2: ["dbpedia", "amazon", "ag", "yahoo"],
        3: ["yahoo", "amazon", "ag", "dbpedia"],
    },
    "long_sequence": {
        4: [
            "mnli",
            "cb",
            "wic",
            "copa",
            "qqp",
            "boolqa",
            "rte",
            "imdb",
            "yelp",
            "amazon",
            "sst-2",
            "dbpedia",
            "ag",
            "multirc",
            "yahoo",
        ],
        5: [
            "multirc",
            "boolqa",
            "wic",
            "mnli",
            "cb",
            "copa",
            "qqp",
            "rte",
            "imdb",
            "sst-2",
            "dbpedia",
            "ag",
            "yelp",
            "amazon",
            "yahoo",
        ],
        6: [
            "yelp",
            "amazon",
            "mnli",
            "cb",
            "copa",
            "qqp",
            "rte",
            "imdb",
            "sst-2",
            "dbpedia",
            "ag",
            "yahoo",
            "multirc",
            "boolqa",
            "wic",
        ],
    },
    "trace": {1: ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]},
}
TRACE_SCORING = {"MeetingBank": "rouge_l", "20Minuten": "rouge_l", "Py150": "edit_similarity"}
CL_COLUMNS = {"prompt": "sentence", "response": "label"}
TRACE_COLUMNS = {"prompt": "prompt", "response": "answer"}


def expand(benchmark: str, data_dir: str | Path, order: int | None) -> list[dict]:
    """The benchmark's tasks in the order asked for, as run-config task entries."""
    if benchmark not in BENCHMARKS:
        raise ILoRAError(
            f"benchmark {benchmark!r} is not one of {BENCHMARKS}{did_you_mean(str(benchmark), BENCHMARKS)}"
        )
    orders = ORDERS[benchmark]
    order = min(orders) if order is None else order
    if order not in orders:
        raise ILoRAError(f"benchmark {benchmark}: order {order!r} is not one of {sorted(orders)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ILoRAError(f"data_dir {data_dir}: no such directory (where the {benchmark} data was unpacked)")
    if benchmark == "trace":
        return [_trace_task(data_dir, name) for name in orders[order]]
    return [_cl_task(data_dir, name) for name in orders[order]]


def _cl_task(data_dir: Path, name: str) -> dict:
    folder = data_dir / CL_FOLDERS[name]
    for file in ("train.json", "test.json", "labels.json"):
        if not (folder / file).is_file():
            raise ILoRAError(f"{folder / file}: missing (O-LoRA's CL_Benchmark layout: <category>/<task>/{file})")
    try:
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{folder / 'labels.json'}: not valid JSON ({err})") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ILoRAError(f"{folder / 'labels.json'}: expected a JSON list of label strings")
    return {
        "name": name,
        "train": str(folder / "train.json"),
        "test": str(folder / "test.json"),
        "scoring": "choice",
        "choices": labels,
        "columns": dict(CL_COLUMNS),
    }


def _trace_task(data_dir: Path, name: str) -> dict:
    folder = data_dir / name
    for file in ("train.json", "test.json"):
        if not (folder / file).is_file():
            raise ILoRAError(f"{folder / file}: missing (TRACE's layout: <task>/{file})")
    return {
        "name": name,
        "train": str(folder / "train.json"),
        "test": str(folder / "test.json"),
        "scoring": TRACE_SCORING.get(name, "exact_match"),
        "columns": dict(TRACE_COLUMNS),
    }
