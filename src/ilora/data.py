"""Reading JSONL tasks, turning rows into token ids with response-only labels, and padding.

Rows carry `prompt` and `response`, or the alpaca keys `instruction` / `input` / `output`.
Every problem with a file is an `ILoRAError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import ILoRAError

IGNORE_INDEX = -100


# ------------------------------------------------------------------ reading
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each normalised to have `prompt` and `response` (other keys kept)."""
    path = Path(path)
    if path.is_dir():
        raise ILoRAError(f"{path}: a directory, not a JSONL file")
    if not path.is_file():
        raise ILoRAError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is fine
    except UnicodeDecodeError as err:
        raise ILoRAError(f"{path}: not UTF-8 text (byte {err.start})") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ILoRAError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ILoRAError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append(normalise_row(row, f"{path}:{line_no}"))
    if not rows:
        raise ILoRAError(f"{path}: no examples (the file is empty)")
    return rows


def normalise_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """`prompt`/`response`, or alpaca `instruction` (+ `input`) / `output`."""
    if "prompt" not in row and "instruction" in row:
        for key in ("instruction", "input"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ILoRAError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        extra = row.get("input") or ""
        row = {**row, "prompt": row["instruction"] + (f"\n{extra}" if extra else ""), "response": row.get("output")}
    for key in ("prompt", "response"):
        if key not in row or row[key] is None:
            raise ILoRAError(f"{where}: missing '{key}' (rows need prompt/response or instruction/output)")
        if not isinstance(row[key], str):
            raise ILoRAError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["response"].strip():
        raise ILoRAError(f"{where}: 'response' is empty")
    return row


# --------------------------------------------------------------- tokenizing
def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    """The prompt text as the model sees it: the chat template's user turn when there is one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    text = format_prompt(tokenizer, prompt, use_chat_template)
    # a chat template already carries its special tokens
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_example(
    tokenizer, prompt: str, response: str, cutoff_len: int, use_chat_template: bool, where: str = "row"
) -> dict[str, list[int]]:
    """Token ids and labels (-100 on the prompt) for one example, at most `cutoff_len` tokens.

    Too long: the response keeps at least half the budget (cut at its end); the prompt is cut at its
    start, so the words next to the answer survive."""
    prompt_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > cutoff_len:
        response_budget = max(cutoff_len - len(prompt_ids), cutoff_len // 2)
        response_ids = response_ids[:response_budget]
        prompt_ids = prompt_ids[len(prompt_ids) - (cutoff_len - len(response_ids)) :]
    if not response_ids:
        raise ILoRAError(f"{where}: response is empty after tokenization and truncation (cutoff_len={cutoff_len})")
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def encode_rows(
    rows: Iterable[dict[str, Any]], tokenizer, cutoff_len: int, use_chat_template: bool, source: str = "dataset"
) -> list[dict[str, list[int]]]:
    return [
        encode_example(tokenizer, r["prompt"], r["response"], cutoff_len, use_chat_template, f"{source} row {i + 1}")
        for i, r in enumerate(rows)
    ]


def prepare_dataset(dataset, tokenizer, cutoff_len: int = 1024, use_chat_template: bool = True):
    """Accept a tokenized dataset (`input_ids`, optional `labels`) as is; tokenize a raw one."""
    if len(dataset) == 0:
        raise ILoRAError("the training dataset is empty")
    first = dataset[0]
    if "input_ids" in first:
        return dataset
    rows = [normalise_row(dict(row), f"dataset row {i + 1}") for i, row in enumerate(dataset)]
    return encode_rows(rows, tokenizer, cutoff_len, use_chat_template)


# ----------------------------------------------------------------- padding
def pad_rows(
    ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows: pad id for inputs, -100 for labels, and the attention mask."""
    lengths = torch.tensor([len(row) for row in ids], device=ids[0].device)
    input_ids = pad_sequence(list(ids), batch_first=True, padding_value=pad_token_id)
    padded_labels = pad_sequence(list(labels), batch_first=True, padding_value=IGNORE_INDEX)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    return input_ids, padded_labels, attention_mask


class PadCollator:
    """Batches examples for ILoRA: right padding, attention mask, and row lengths as host ints
    (the method slices rows by them without reading anything back from the device)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        input_ids, padded_labels, attention_mask = pad_rows(ids, labels, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "labels": padded_labels,
            "attention_mask": attention_mask,
            "lengths": [len(row) for row in ids],
        }
