"""General ability: per-token perplexity on a held-out general text, before and after every task.

Forgetting of the sequence's own tasks is in the accuracy matrix; what users fear most is losing what
the base model could do in general. A run config's `general:` names a plain-text file (or JSON Lines
with a `text` field); its tokens are cut into `general_windows` consecutive windows of `cutoff_len`
tokens, and the perplexity is exp(mean next-token negative log-likelihood) over every predicted token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ilora.errors import ILoRAError, TrainingDiverged
from ilora.files import check_regular_file
from ilora.runtime.precision import inference


def read_text(path: str | Path) -> str:
    """A .txt file's text, or the `text` fields of a JSON Lines file, joined by blank lines."""
    path = Path(path)
    check_regular_file(path, "general: ")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ILoRAError(f"general: {path}: not UTF-8 text (byte {err.start})") from None
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ILoRAError(f"general: {path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ILoRAError(f"general: {path}:{line_no}: expected an object with a string 'text'")
        texts.append(row["text"])
    return "\n\n".join(texts)


def windows(text: str, tokenizer, window: int, count: int, where: str = "general") -> list[list[int]]:
    """The text's first `count` consecutive windows of `window` tokens (a shorter last one dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = [ids[i : i + window] for i in range(0, min(len(ids), window * count), window)]
    cut = [w for w in cut if len(w) == window]
    if not cut:
        raise ILoRAError(f"{where}: the text has {len(ids)} tokens, fewer than one window of {window}")
    return cut


@torch.inference_mode()
def perplexity(model, chunks: list[list[int]], batch_size: int = 16, autocast: torch.dtype | None = None) -> float:
    """exp(mean NLL of every next token) of `model` (whatever adapters are active) over the windows."""
    total, count = 0.0, 0
    with inference(model, autocast):
        for start in range(0, len(chunks), batch_size):
            ids = torch.tensor(chunks[start : start + batch_size], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
    value = math.exp(total / count)
    if not math.isfinite(value):
        raise TrainingDiverged("general: the perplexity is not finite (a diverged adapter or an overflow)")
    return value
