"""Data in: local files through Hugging Face `datasets`, in the formats users' tools already write.

Files: JSON Lines (`.jsonl`), JSON (a list of rows, `.json`), CSV, Parquet, or a directory written by
`Dataset.save_to_disk`; `datasets` memory-maps them and caches what is derived from them, so a large
file is not held as Python lists. Row formats (LLaMA-Factory's names):

- ilora's own: `prompt`, `response`;
- alpaca: `instruction`, `input`, `output`, optional `system` and `history` (earlier [user, assistant] pairs);
- sharegpt: `conversations` as `from`/`value` turns (human, gpt, system), or `messages` as `role`/`content`
  turns (user, assistant, system), with an optional `system` column; several turns.

`formatting: auto` (the default for a file) tells them apart by their keys. A LLaMA-Factory
`dataset_info.json` names datasets with their `file_name`, `formatting`, `columns`, `tags` and
`num_samples` (a key LLaMA-Factory does not read is refused);
`--dataset a,b --dataset_dir DIR` concatenates several. Every row becomes `messages` (an optional system
turn, then user and assistant turns alternating, ending with the assistant), plus `prompt` and
`response` (the last user and assistant turns). The loss is on every assistant turn (see
`data.encode_messages`). Every problem is one line naming the file, the row and the field.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilora.errors import ILoRAError, did_you_mean
from ilora.files import check_regular_file, file_digest, read_json

FORMATTINGS = ("auto", "alpaca", "sharegpt")
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function",
}
DATASET_INFO = "dataset_info.json"
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Format:
    """How a file's rows are read: LLaMA-Factory's `formatting`, `columns` and `tags`."""

    formatting: str = "auto"
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


# ------------------------------------------------------------------- rows
def normalise_row(row: dict[str, Any], where: str, fmt: Format = Format()) -> dict[str, Any]:
    """One row as `messages` + `prompt` + `response`."""
    formatting = fmt.formatting if fmt.formatting != "auto" else _detect(row, where)
    if formatting == "prompt":
        messages = [
            _turn("user", row.get("prompt"), where, "prompt"),
            _turn("assistant", row.get("response"), where, "response"),
        ]
        if row.get("system"):
            messages.insert(0, _turn("system", row["system"], where, "system"))
    elif formatting == "alpaca":
        messages = _alpaca(row, where, {**ALPACA_COLUMNS, **fmt.columns})
    else:
        messages = _sharegpt(row, where, {**SHAREGPT_COLUMNS, **fmt.columns}, fmt.tags)
    if not messages[-1]["content"].strip():
        raise ILoRAError(f"{where}: 'response' is empty (the last assistant turn)")
    normalised = {"messages": messages, "prompt": messages[-2]["content"], "response": messages[-1]["content"]}
    if row.get("choices") is not None:  # a test row's own candidate answers
        normalised["choices"] = row["choices"]
    return normalised


def _detect(row: dict, where: str) -> str:
    if "prompt" in row or "response" in row:
        return "prompt"
    if "instruction" in row:
        return "alpaca"
    if "conversations" in row or "messages" in row:
        return "sharegpt"
    raise ILoRAError(
        f"{where}: missing 'prompt' (rows need prompt/response, alpaca instruction/output, "
        f"or sharegpt conversations/messages; keys here: {sorted(row)})"
    )


def _turn(role: str, content: Any, where: str, key: str) -> dict[str, str]:
    if content is None:
        raise ILoRAError(f"{where}: missing '{key}'")
    if not isinstance(content, str):
        raise ILoRAError(f"{where}: '{key}' must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _alpaca(row: dict, where: str, columns: dict) -> list[dict[str, str]]:
    instruction = _turn("user", row.get(columns["prompt"]), where, columns["prompt"])["content"]
    query = row.get(columns["query"]) or ""
    if not isinstance(query, str):
        raise ILoRAError(f"{where}: '{columns['query']}' must be a string, got {type(query).__name__}")
    messages = []
    if row.get(columns["system"]):
        messages.append(_turn("system", row[columns["system"]], where, columns["system"]))
    history = row.get(columns["history"]) or []
    if not isinstance(history, list):
        raise ILoRAError(f"{where}: '{columns['history']}' must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history, start=1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ILoRAError(f"{where}: '{columns['history']}' entry {k} must be a [user, assistant] pair")
        messages += [
            _turn("user", pair[0], where, f"{columns['history']}[{k}][0]"),
            _turn("assistant", pair[1], where, f"{columns['history']}[{k}][1]"),
        ]
    messages.append({"role": "user", "content": instruction + (f"\n{query}" if query else "")})
    messages.append(_turn("assistant", row.get(columns["response"]), where, columns["response"]))
    return messages


def _sharegpt(row: dict, where: str, columns: dict, tags: dict) -> list[dict[str, str]]:
    # the mapped column; a `messages` column (role/content turns) where the mapped one is absent
    key = "messages" if columns["messages"] not in row and "messages" in row else columns["messages"]
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise ILoRAError(f"{where}: '{key}' must be a non-empty list of turns")
    if not tags:
        tags = OPENAI_TAGS if isinstance(turns[0], dict) and "role" in turns[0] else SHAREGPT_TAGS
    tags = {**SHAREGPT_TAGS, **tags}
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    if row.get(columns["system"]):
        messages.append(_turn("system", row[columns["system"]], where, columns["system"]))
    for k, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ILoRAError(
                f"{where}: '{key}' turn {k} must be an object with '{tags['role_tag']}' and '{tags['content_tag']}'"
            )
        tag = turn.get(tags["role_tag"])
        if tag in (tags["observation_tag"], tags["function_tag"]):
            raise ILoRAError(f"{where}: '{key}' turn {k} is a tool turn ({tag!r}); tool calls are not supported")
        if tag not in roles:
            raise ILoRAError(
                f"{where}: '{key}' turn {k} has role {tag!r}; expected one of {sorted(roles)}"
                f"{did_you_mean(str(tag), roles)}"
            )
        messages.append(_turn(roles[tag], turn.get(tags["content_tag"]), where, f"{key}[{k}].{tags['content_tag']}"))
    _check_alternation(messages, where, key)
    return messages


def _check_alternation(messages: list[dict], where: str, key: str) -> None:
    """An optional leading system turn, then user and assistant alternating, ending with the assistant."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2)
    if len(body) < 2 or len(body) % 2 or [m["role"] for m in body] != expected:
        raise ILoRAError(
            f"{where}: '{key}' must alternate user and assistant turns, starting with the user and "
            f"ending with the assistant (got {[m['role'] for m in messages]})"
        )


# ------------------------------------------------------------------ files
def read_rows(path: str | Path, fmt: Format = Format()):
    """A file's rows, normalised, as a `datasets.Dataset` (columns messages, prompt, response)."""
    path = Path(path)
    with quiet():
        table = _load_table(path, fmt)
        if len(table) == 0:
            raise ILoRAError(f"{path}: no examples (the file is empty)")
        return table.map(
            lambda row, i: normalise_row(row, _where(path, i), fmt),
            with_indices=True,
            remove_columns=table.column_names,
        )


@contextlib.contextmanager
def quiet():
    """No `datasets` progress bars or warnings for ilora's own small steps (a refusal stays one line on
    stderr: ilora names the file and the cause itself); the user's settings are restored after."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors are re-raised, naming the file
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if enabled:
            datasets.enable_progress_bars()


def _where(path: Path, index: int) -> str:
    return f"{path} row {index + 1}"


def _load_table(path: Path, fmt: Format):
    import datasets

    if path.is_dir():
        if not (path / "state.json").is_file():
            raise ILoRAError(f"{path}: a directory, but not one written by Dataset.save_to_disk (no state.json)")
        return datasets.load_from_disk(str(path))
    check_regular_file(path)
    kind = SUFFIXES.get(path.suffix.lower(), "json")  # ilora has always read JSON Lines by any name
    if kind == "json":
        _check_json(path, fmt)
    if kind == "parquet":
        _check_parquet(path)
    options = _csv_as_text(path) if kind == "csv" else {}
    try:
        # `datasets` keys its cache by path and modification time: a file replaced by one with the same
        # time (cp -p, rsync -t, tar) would read back the old rows. A cache per content cannot.
        cache = Path(datasets.config.HF_DATASETS_CACHE) / "ilora-by-content" / file_digest(path)
        return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache), **options)
    except Exception as err:  # pyarrow / datasets parse errors: one line naming the file
        cause = err.__cause__ or err
        raise ILoRAError(f"{path}: cannot be read as {kind} ({' '.join(str(cause).split())[:300]})") from None


def _csv_as_text(path: Path) -> dict:
    """CSV cells read as text, as in every other format: a label column of 0/1 stays "0"/"1" (pandas
    would make it a number), an empty cell stays "" (not NaN)."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as err:
        raise ILoRAError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not header:
        raise ILoRAError(f"{path}: no examples (the file is empty)")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ILoRAError(f"{path}: the header repeats column {repeated[0]!r}")
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}


def _check_parquet(path: Path) -> None:
    """A Parquet file starts with PAR1; anything else is named for what it looks like."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return
    looks = head.lstrip()[:1]
    hint = (
        "; it looks like JSON: name it .jsonl or .json"
        if looks in (b"{", b"[")
        else "; it looks like text: name it .csv or .jsonl for what it holds"
        if head.isascii() and head.strip()
        else ""
    )
    raise ILoRAError(f"{path}: not a Parquet file (it does not start with PAR1){hint}")


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The field of a parsed JSON value holding a lone UTF-16 surrogate (JSON allows the escape,
    UTF-8 cannot hold it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the value"
    elif isinstance(value, dict):
        return next(
            (f for k, v in value.items() if (f := _lone_surrogate(v, f"{where}.{k}" if where else str(k)))), None
        )
    elif isinstance(value, list):
        return next((f for i, v in enumerate(value) if (f := _lone_surrogate(v, f"{where}[{i + 1}]"))), None)
    return None


def _check_row(row: Any, where: str, fmt: Format) -> None:
    if not isinstance(row, dict):
        raise ILoRAError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field_name = _lone_surrogate(row)
    if field_name:
        raise ILoRAError(
            f"{where}: '{field_name}' holds a lone UTF-16 surrogate (half of an emoji or other "
            "character cut by the writer), which is not text"
        )
    normalise_row(row, where, fmt)


def _refuse_wrapped_object(path: Path, handle) -> None:
    """A .json file starting with '{': one row per line is JSON Lines; one object around the rows
    (`{"data": [...]}`) or a pretty-printed object is not a list of rows."""
    handle.seek(0)
    try:
        whole = json.load(handle)
    except json.JSONDecodeError:
        return  # several objects, one per line: JSON Lines, checked line by line
    if not isinstance(whole, dict):
        return
    wrapper = next(
        (k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)), None
    )
    handle.seek(0)
    lines = sum(1 for line in handle if line.strip())
    if wrapper is not None:
        raise ILoRAError(
            f"{path}: holds one JSON object, not a list of rows; its key {wrapper!r} holds a list of "
            "rows: write that list alone ([{...}, ...])"
        )
    if lines > 1:
        raise ILoRAError(
            f"{path}: holds one JSON object over {lines} lines; a .json file holds a list of rows "
            "([{...}, ...]), a .jsonl file one row per line"
        )


def _check_json(path: Path, fmt: Format) -> None:
    """JSON Lines are checked line by line first, row format included (constant memory), so an error
    names the line; a JSON file must hold a list of objects."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            first = next((line for line in handle if line.strip()), "")
            if path.suffix.lower() == ".json" and first.lstrip().startswith("["):
                handle.seek(0)
                rows = json.load(handle)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise ILoRAError(f"{path}: a JSON file must hold a list of objects")
                if not rows:
                    raise ILoRAError(f"{path}: no examples (the list is empty)")
                for index, row in enumerate(rows):
                    _check_row(row, f"{path} row {index + 1}", fmt)
                return
            if path.suffix.lower() == ".json" and first.lstrip().startswith("{"):
                _refuse_wrapped_object(path, handle)
            if not first:
                raise ILoRAError(f"{path}: no examples (the file is empty)")
            handle.seek(0)
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ILoRAError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                _check_row(row, f"{path}:{line_no}", fmt)
    except UnicodeDecodeError as err:
        raise ILoRAError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ILoRAError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


# --------------------------------------------------------- dataset_info.json
def read_named(names: str, dataset_dir: str | Path):
    """Datasets named in `dataset_dir/dataset_info.json` (comma-separated names), concatenated."""
    import datasets

    dataset_dir = Path(dataset_dir)
    info = _dataset_info(dataset_dir)
    parts = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in info:
            raise ILoRAError(f"dataset {name!r} is not in {dataset_dir / DATASET_INFO}{did_you_mean(name, info)}")
        entry = _entry(info[name], name, dataset_dir)
        rows = read_rows(entry.path, entry.fmt)
        parts.append(rows if entry.num_samples is None else draw_samples(rows, entry.num_samples))
    if not parts:
        raise ILoRAError(f"--dataset names no dataset of {dataset_dir / DATASET_INFO}")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _dataset_info(dataset_dir: Path) -> dict:
    path = dataset_dir / DATASET_INFO
    if not path.is_file():
        raise ILoRAError(f"dataset_dir {dataset_dir}: no {DATASET_INFO}")
    info = read_json(path, "dataset description")
    if not isinstance(info, dict):
        raise ILoRAError(f"{path}: expected an object mapping dataset names to their description")
    return info


# The keys of a dataset_info.json entry that LLaMA-Factory reads; ilora reads local files, so the hub
# ones are refused when there is no file_name, and subset/folder (hub only) are refused outright.
ENTRY_KEYS = (
    "file_name",
    "formatting",
    "columns",
    "tags",
    "num_samples",
    "split",
    "ranking",
    "subset",
    "folder",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
)
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class Entry:
    """One dataset of a dataset_info.json: its file, how its rows read, how many rows to draw."""

    path: Path
    fmt: Format
    num_samples: int | None = None


def _entry(entry: Any, name: str, dataset_dir: Path) -> Entry:
    where = f"{dataset_dir / DATASET_INFO}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise ILoRAError(f"{where}: expected an object with file_name")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ILoRAError(
            f"{where}: unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), ENTRY_KEYS)} "
            f"(LLaMA-Factory reads {', '.join(ENTRY_KEYS)})"
        )
    for remote in REMOTE_KEYS:
        if remote in entry and "file_name" not in entry:
            raise ILoRAError(f"{where}: '{remote}' needs a download; ilora reads local files only (set file_name)")
    for hub_only in ("subset", "folder"):
        if hub_only in entry:
            raise ILoRAError(f"{where}: '{hub_only}' selects part of a hub dataset; a local file_name has none")
    if entry.get("split", "train") != "train":
        raise ILoRAError(f"{where}: split {entry['split']!r}: a local file has one split, 'train'")
    if entry.get("ranking"):
        raise ILoRAError(f"{where}: a ranking (preference) dataset; ilora trains on supervised rows")
    if not isinstance(entry.get("file_name"), str):
        raise ILoRAError(f"{where}: 'file_name' must name a file in {dataset_dir}")
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in FORMATTINGS[1:]:
        raise ILoRAError(
            f"{where}: formatting {formatting!r} is not one of {FORMATTINGS[1:]}"
            f"{did_you_mean(str(formatting), FORMATTINGS[1:])}"
        )
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key, {}), dict):
            raise ILoRAError(f"{where}: '{key}' must be an object")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ILoRAError(f"{where}: num_samples must be a whole number >= 1, got {num_samples!r}")
    fmt = Format(formatting, entry.get("columns", {}), entry.get("tags", {}))
    return Entry(dataset_dir / entry["file_name"], fmt, num_samples)


def draw_samples(rows, num_samples: int, seed: int = 0):
    """`num_samples` rows as LLaMA-Factory draws them: a permutation of every row first (all are used
    when there are enough draws), then rows drawn again at random beyond the file's length. Fixed seed:
    the same rows in every run of the same file."""
    import numpy as np

    rng = np.random.default_rng(seed)
    indexes = rng.permutation(len(rows))[:num_samples]
    if num_samples > len(rows):
        indexes = np.concatenate([indexes, rng.choice(len(rows), num_samples - len(rows))])
    return rows.select(indexes.tolist())


def read_data(spec: str, dataset_dir: str | Path | None = None, columns: dict | None = None):
    """A file path, or (with dataset_dir) names in its dataset_info.json. `columns` maps LLaMA-Factory's
    column names (prompt, query, response, system, history) to a file's own (alpaca formatting)."""
    if dataset_dir:
        return read_named(spec, dataset_dir)
    return read_rows(spec, Format("alpaca", columns) if columns else Format())


def source_files(spec: str, dataset_dir: str | Path | None = None) -> list[Path]:
    """Every file the data is read from (what a run's input digest covers)."""
    if dataset_dir:
        dataset_dir = Path(dataset_dir)
        info = _dataset_info(dataset_dir)
        named = [_entry(info.get(n.strip()), n.strip(), dataset_dir).path for n in spec.split(",") if n.strip()]
        return [dataset_dir / DATASET_INFO] + [f for path in named for f in _files(path)]
    return _files(Path(spec))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
