"""Scoring a model on a task's test set.

`choice`: rank the task's candidate answers by their log-likelihood given the prompt (sum over the
answer's tokens, end-of-sequence included, exactly as the answer was trained). The prompt is run
once; its KV cache is then shared by all candidates (`score_choices`). `score_choices_naive` runs one
full forward per candidate, as most harnesses do; it is kept as the reference the fast path is
tested and benchmarked against.
`exact_match`: greedy generation, normalised string match. `rouge_l` (ROUGE-L F1, Google's rouge-score,
whitespace tokens so any language counts) and `edit_similarity` (rapidfuzz's `fuzz.ratio` / 100, the
Levenshtein similarity TRACE uses for code) score the same generations against the reference; a task's
"accuracy" is then the mean score in [0, 1].
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ilora.config.arguments import SCORINGS
from ilora.config.checks import check_choices
from ilora.data.encode import answer_ids, context_before_answer, messages_of
from ilora.errors import ILoRAError, TrainingDiverged
from ilora.runtime.precision import inference


@dataclass
class TestSet:
    """A task's test rows, tokenized once and reused after every task of the sequence."""

    name: str
    scoring: str
    prompts: list[list[int]]
    answers: list[str]
    choices: list[list[str]] = field(default_factory=list)  # per row, for `choice`
    choice_ids: list[list[list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def gold(self) -> list[int]:
        return [row.index(answer) for row, answer in zip(self.choices, self.answers)]


def build_test_set(
    name: str,
    rows: Sequence[dict],
    tokenizer,
    scoring: str,
    task_choices: Sequence[str] | None,
    cutoff_len: int,
    use_chat_template: bool,
    source: str = "",
) -> TestSet:
    if scoring not in SCORINGS:
        raise ILoRAError(f"task {name!r}: scoring must be one of {SCORINGS}, got {scoring!r}")
    test = TestSet(name, scoring, [], [])
    for line, row in enumerate(rows, start=1):
        answer = row["response"]
        choices = row.get("choices") or task_choices or []
        candidates: list[list[int]] = []
        if scoring == "choice":
            if not choices:
                raise ILoRAError(f"{source}:{line}: choice scoring needs at least two choices (per row or per task)")
            choices = check_choices(choices, f"{source}:{line}")
            if answer not in choices:
                raise ILoRAError(f"{source}:{line}: answer {answer!r} is not among the choices {choices}")
            candidates = [answer_ids(tokenizer, c) for c in choices]
        budget = cutoff_len - max((len(a) for a in candidates), default=0)
        prompt = context_before_answer(tokenizer, messages_of(row), use_chat_template)[0]
        test.prompts.append(prompt[max(0, len(prompt) - budget) :])
        test.answers.append(answer)
        if scoring == "choice":
            test.choices.append(choices)
            test.choice_ids.append(candidates)
    if not test.prompts:
        raise ILoRAError(f"task {name!r}: the test set is empty ({source})")
    return test


# ------------------------------------------------------------------- choice
@torch.inference_mode()
def score_choices(model, test: TestSet, pad_token_id: int, batch_size: int = 16) -> list[list[float]]:
    """Log-likelihood of every candidate: one prompt pass per row, then all candidates on its cache."""
    device = model.device
    scores: list[list[float]] = [[] for _ in range(len(test))]
    for rows in length_grouped_batches([len(p) for p in test.prompts], batch_size):
        prompts = [torch.tensor(test.prompts[r]) for r in rows]
        input_ids, mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)

        owner = [i for i, r in enumerate(rows) for _ in test.choice_ids[r]]
        candidates = [torch.tensor(c, device=device) for r in rows for c in test.choice_ids[r]]
        index = torch.tensor(owner, device=device)
        total = first[index, torch.stack([c[0] for c in candidates])]
        if max(len(c) for c in candidates) > 1:
            cache = out.cache
            cache.reorder_cache(index)
            cand_ids = pad_sequence(candidates, batch_first=True, padding_value=pad_token_id)
            cand_mask = pad_sequence([torch.ones_like(c) for c in candidates], batch_first=True)
            feed, target, target_mask = cand_ids[:, :-1], cand_ids[:, 1:], cand_mask[:, 1:]
            start = mask.sum(-1)[index]
            rest = model(
                input_ids=feed,
                attention_mask=torch.cat([mask[index], cand_mask[:, :-1]], dim=1),
                position_ids=start[:, None] + torch.arange(feed.shape[1], device=device)[None, :],
                cache=cache,
                use_cache=True,
            )
            logp = F.log_softmax(rest.logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]
            total = total + (logp * target_mask).sum(-1)
        for i, value in zip(owner, total.tolist()):
            scores[rows[i]].append(value)
    return scores


@torch.inference_mode()
def score_choices_naive(model, test: TestSet, pad_token_id: int, batch_size: int = 16) -> list[list[float]]:
    """Reference: one full forward of prompt + candidate for every candidate."""
    pairs = [(r, c) for r in range(len(test)) for c in range(len(test.choice_ids[r]))]
    scores: list[list[float]] = [[] for _ in range(len(test))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [torch.tensor(test.prompts[r] + test.choice_ids[r][c], device=model.device) for r, c in chunk]
        input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_token_id)
        mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        logp = F.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (r, c) in enumerate(chunk):
            p, a = len(test.prompts[r]), len(test.choice_ids[r][c])
            target = torch.tensor(test.choice_ids[r][c], device=model.device)
            scores[r].append(logp[row, p - 1 : p + a - 1].gather(-1, target[:, None]).sum().item())
    return scores


def predict_choices(scores: list[list[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


# -------------------------------------------------------------- exact match
@torch.inference_mode()
def generate_answers(model, tokenizer, test: TestSet, max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    answers: list[str] = [""] * len(test)
    for rows in length_grouped_batches([len(p) for p in test.prompts], batch_size):
        input_ids, mask = left_pad([torch.tensor(test.prompts[r]) for r in rows], tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for r, new in zip(rows, out[:, input_ids.shape[1] :]):
            answers[r] = tokenizer.decode(new, skip_special_tokens=True)
    return answers


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def generation_scores(scoring: str, predictions: list[str], answers: list[str]) -> list[float]:
    """Per-row score of generated answers: exact match (0/1), ROUGE-L F1 or edit similarity (0..1)."""
    if scoring == "exact_match":
        return [float(normalise(p) == normalise(a)) for p, a in zip(predictions, answers)]
    if scoring == "rouge_l":
        scorer = _library("rouge_score.rouge_scorer", "rouge-score", scoring).RougeScorer(
            ["rougeL"], tokenizer=_Words()
        )
        return [scorer.score(a, p)["rougeL"].fmeasure for p, a in zip(predictions, answers)]
    fuzz = _library("rapidfuzz.fuzz", "rapidfuzz", scoring)
    return [fuzz.ratio(p, a) / 100.0 for p, a in zip(predictions, answers)]


class _Words:
    """Lower-cased whitespace tokens (rouge-score's own tokenizer drops every non-ASCII letter)."""

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


def _library(module: str, package: str, scoring: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ILoRAError(f"scoring {scoring} needs {package}: pip install 'ilora[metrics]'") from None


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


# -------------------------------------------------------------- the entry
def evaluate(
    model, tokenizer, test: TestSet, batch_size: int = 16, max_new_tokens: int = 16, autocast: torch.dtype | None = None
) -> dict:
    """Accuracy and each prediction of `model` (with whatever adapter is active) on one test set."""
    with inference(model, autocast):
        if test.scoring == "choice":
            scores = score_choices(model, test, tokenizer.pad_token_id, batch_size)
            if not all(math.isfinite(v) for row in scores for v in row):  # argmax of NaN picks choice 0
                raise TrainingDiverged(
                    f"task {test.name!r}: the model's answer scores are NaN or inf "
                    "(a diverged adapter, or an overflow in reduced precision)"
                )
            picks = predict_choices(scores)
            predictions = [test.choices[r][p] for r, p in enumerate(picks)]
            correct = [p == g for p, g in zip(picks, test.gold())]
        else:
            predictions = generate_answers(model, tokenizer, test, max_new_tokens, batch_size)
            correct = generation_scores(test.scoring, predictions, test.answers)
    return {"accuracy": sum(correct) / len(correct), "predictions": predictions}


# ----------------------------------------------------------------- helpers
def left_pad(rows: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches: rows of similar length share a batch, less padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------- a run's test sets
def subsample(rows: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most `limit` rows, drawn once with a fixed seed and kept in file order: the same subsample
    after every task and in every run of the same file."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def test_set_of(task, rows, tokenizer, cutoff_len: int, use_chat_template: bool) -> TestSet:
    """A run task's (config.arguments.TaskSpec) test set from its rows."""
    return build_test_set(
        task.name, rows, tokenizer, task.scoring, task.choices, cutoff_len, use_chat_template, task.test
    )


class Scorer:
    """Every test set of a run (and the general text's windows, if any), scored on a model as its
    forward stands: the base model, or inside `methods.base.evaluating` an evaluated model."""

    def __init__(
        self,
        tokenizer,
        tests: list[TestSet],
        batch_size: int,
        max_new_tokens: int,
        autocast,
        quiet: bool = False,
        windows: list[list[int]] | None = None,
    ):
        self.tokenizer, self.tests, self.windows = tokenizer, tests, windows
        self.batch_size, self.max_new_tokens, self.autocast = batch_size, max_new_tokens, autocast
        self.quiet = quiet  # the Trainer's disable_tqdm: no progress bars at all

    def score(self, model, only: list[str] | None = None, label: str = "") -> dict[str, dict]:
        """Every test set (or those named in `only`): accuracy and predictions."""
        from tqdm.auto import tqdm

        tests = [t for t in self.tests if only is None or t.name in only]
        results = {}
        for test in tqdm(tests, desc=f"eval {label}".strip(), leave=False, disable=self.quiet):
            results[test.name] = evaluate(
                model, self.tokenizer, test, self.batch_size, self.max_new_tokens, self.autocast
            )
        return results

    def perplexity(self, model) -> float:
        """Perplexity on the general text's windows."""
        from ilora.evaluation.general import perplexity

        return perplexity(model, self.windows, self.batch_size, self.autocast)
