"""Turning rows into token ids with labels on the assistant's tokens only, and padding.

Rows come from `ilora.data.formats` as `messages` (an optional system turn, then user and assistant turns
alternating). The loss is on every assistant turn (its tokens and the end-of-sequence token), never on
user or system text. With a chat template the context before each answer is the template's rendering
(its generation prompt included); without one, the turns' texts joined by newlines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ilora.errors import ILoRAError

IGNORE_INDEX = -100


def uses_template(tokenizer, use_chat_template: bool) -> bool:
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_context(tokenizer, messages: list[dict], use_chat_template: bool) -> str:
    """The conversation before an assistant answer, as the model sees it."""
    if uses_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode_context(tokenizer, messages: list[dict], use_chat_template: bool) -> list[int]:
    """Token ids of turns that precede any answer (a system and a user turn)."""
    chat = uses_template(tokenizer, use_chat_template)
    # a chat template already carries its special tokens
    return tokenizer(format_context(tokenizer, messages, use_chat_template), add_special_tokens=not chat)["input_ids"]


def encode_messages(
    tokenizer, messages: list[dict], cutoff_len: int, use_chat_template: bool, where: str = "row"
) -> dict[str, list[int]]:
    """Token ids and labels for a conversation, at most `cutoff_len` tokens; labels on every assistant turn.

    Too long: the last answer keeps at least half the budget (cut at its end); what comes before it is
    cut at its start, so the words next to the answer survive."""
    ids, labels = context_before_answer(tokenizer, messages, use_chat_template, where)
    return _fit(ids, labels, answer_ids(tokenizer, messages[-1]["content"]), cutoff_len, where)


def context_before_answer(
    tokenizer, messages: list[dict], use_chat_template: bool, where: str = "row"
) -> tuple[list[int], list[int]]:
    """Ids and labels of everything before the last assistant answer: what evaluation scores after,
    token for token what training puts before it."""
    ids: list[int] = []
    labels: list[int] = []
    answered = 0  # messages already in `ids`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with _template_errors(where):
            context = _context_ids(tokenizer, messages, answered, i, use_chat_template)
        if i == len(messages) - 1:
            return ids + context, labels + [IGNORE_INDEX] * len(context)
        answer = answer_ids(tokenizer, message["content"])
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        answered = i + 1
    raise ILoRAError(f"{where}: the conversation does not end with an assistant turn")


@contextlib.contextmanager
def _template_errors(where: str):
    """A chat template that does not parse, or raises on this conversation: one line naming the row."""
    import jinja2

    try:
        yield
    except jinja2.TemplateError as err:
        raise ILoRAError(
            f"{where}: the tokenizer's chat template fails on this conversation ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); fix the template, or set use_chat_template: false"
        ) from None


def answer_ids(tokenizer, text: str) -> list[int]:
    """An answer's tokens as training sees them: the text, then end-of-sequence."""
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return answer + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else answer


def _context_ids(tokenizer, messages: list[dict], answered: int, i: int, use_chat_template: bool) -> list[int]:
    """The tokens between the previous answer (or the start) and answer `i`."""
    if answered == 0:
        return encode_context(tokenizer, messages[:i], use_chat_template)
    if uses_template(tokenizer, use_chat_template):
        full = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        eos = tokenizer.eos_token or ""
        before = tokenizer.apply_chat_template(messages[: answered - 1], tokenize=False, add_generation_prompt=True)
        done = before + messages[answered - 1]["content"] + eos  # what `ids` holds, as text
        if not full.startswith(done):
            done = tokenizer.apply_chat_template(messages[:answered], tokenize=False)
        text = full[len(done) :] if full.startswith(done) else full
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n" + "\n".join(m["content"] for m in messages[answered:i])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _fit(prompt_ids: list[int], prompt_labels: list[int], answer: list[int], cutoff_len: int, where: str):
    if len(prompt_ids) + len(answer) > cutoff_len:
        budget = max(cutoff_len - len(prompt_ids), cutoff_len // 2)
        answer = answer[:budget]
        keep = cutoff_len - len(answer)
        prompt_ids, prompt_labels = prompt_ids[len(prompt_ids) - keep :], prompt_labels[len(prompt_labels) - keep :]
    if not answer:
        raise ILoRAError(f"{where}: response is empty after tokenization and truncation")
    return {"input_ids": prompt_ids + answer, "labels": prompt_labels + answer}


def encode_example(
    tokenizer, prompt: str, response: str, cutoff_len: int, use_chat_template: bool, where: str = "row"
) -> dict[str, list[int]]:
    """One prompt and its answer (a one-turn conversation)."""
    return encode_messages(
        tokenizer, messages_of({"prompt": prompt, "response": response}), cutoff_len, use_chat_template, where
    )


def messages_of(row: dict) -> list[dict]:
    """A row's turns: its `messages` (rows from `data.formats`), or one turn of prompt and response
    (rows built in code)."""
    return row.get("messages") or [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]


def encode_rows(rows, tokenizer, cutoff_len: int, use_chat_template: bool, source: str = "dataset"):
    """Encode normalised rows: a `datasets.Dataset` stays one (cached, memory-mapped), a list stays a list."""

    def encode(row: dict, index: int) -> dict[str, list[int]]:
        return encode_messages(tokenizer, messages_of(row), cutoff_len, use_chat_template, f"{source} row {index + 1}")

    if isinstance(rows, list):
        return [encode(row, i) for i, row in enumerate(rows)]
    from ilora.data.formats import quiet

    with quiet():
        return rows.map(encode, with_indices=True, remove_columns=rows.column_names)


def prepare_dataset(dataset, tokenizer, cutoff_len: int = 1024, use_chat_template: bool = True):
    """Accept a tokenized dataset (`input_ids`, optional `labels`) as is; normalise and tokenize a raw one
    (any row format `ilora.formats` reads)."""
    from ilora.data.formats import normalise_row

    if len(dataset) == 0:
        raise ILoRAError("the training dataset is empty")
    if "input_ids" in dataset[0]:
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
