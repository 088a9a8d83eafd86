"""Reservoir replay buffer over every training example seen, across tasks.

Examples are stored unpadded (token ids + labels + task id), with optional per-row tensors a method
keeps beside them (DER++'s logits, `extras`). Saving writes safetensors + JSON (no pickle), including
the RNG state and `num_seen`, so a chained task continues the same reservoir.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ilora.data.encode import IGNORE_INDEX
from ilora.errors import ILoRAError
from ilora.files import write_json

TENSORS_FILE = "buffer.safetensors"
STATE_FILE = "buffer.json"
EXTRA, EXTRA_LENGTHS = "extra.", "extra_lengths."  # tensor-name prefixes of the per-row extras


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ILoRAError(f"buffer capacity {capacity} must be >= 0")
        self.capacity = capacity
        self.num_seen = 0
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.task_ids: list[str] = []
        self.extras: list[dict[str, torch.Tensor]] = []  # per row; the same keys in every row, or none
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        task_id: str = "",
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Reservoir sampling (Vitter's algorithm R): after n examples each is kept with probability capacity/n."""
        self.num_seen += 1
        if self.capacity == 0:
            return
        if len(self) < self.capacity:
            self.input_ids.append(input_ids)
            self.labels.append(labels)
            self.task_ids.append(task_id)
            self.extras.append(extras or {})
            return
        slot = self._rng.randrange(self.num_seen)
        if slot < self.capacity:
            self.input_ids[slot] = input_ids
            self.labels[slot] = labels
            self.task_ids[slot] = task_id
            self.extras[slot] = extras or {}

    def bytes_per_row(self) -> dict[str, float]:
        """Mean bytes a stored row takes: its tokens and labels, and what methods keep beside them."""
        if not self.input_ids:
            return {"tokens": 0.0, "extras": 0.0}
        tokens = sum(ids.nbytes + labels.nbytes for ids, labels in zip(self.input_ids, self.labels))
        extras = sum(v.nbytes for row in self.extras for v in row.values())
        return {"tokens": tokens / len(self), "extras": extras / len(self)}

    def sample(self, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Up to `size` distinct stored rows (without replacement): token ids, labels, and the per-row
        tensors a method keeps beside them."""
        picks = self._rng.sample(range(len(self)), min(size, len(self)))
        return [self.input_ids[i] for i in picks], [self.labels[i] for i in picks], [self.extras[i] for i in picks]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lengths = torch.tensor([len(t) for t in self.input_ids], dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        tensors = {
            "input_ids": torch.cat([t.cpu() for t in self.input_ids]) if self.input_ids else empty,
            "labels": torch.cat([t.cpu() for t in self.labels]) if self.labels else empty,
            "lengths": lengths,
        }
        for key in self.extras[0] if self.extras else ():
            rows = [row[key].cpu() for row in self.extras]
            tensors[f"{EXTRA}{key}"] = torch.cat(rows)
            tensors[f"{EXTRA_LENGTHS}{key}"] = torch.tensor([len(t) for t in rows], dtype=torch.int64)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / TENSORS_FILE))
        version, internal, gauss = self._rng.getstate()
        state = {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "task_ids": self.task_ids,
            "rng_state": [version, list(internal), gauss],
        }
        write_json(directory / STATE_FILE, state, indent=None)

    @classmethod
    def load(cls, directory: str | Path, capacity: int | None = None) -> ReplayBuffer:
        """Load a saved buffer, checking that its two files agree. A different `capacity` is refused:
        it would change the reservoir's meaning."""
        directory = Path(directory)
        for name in (TENSORS_FILE, STATE_FILE):
            if not (directory / name).is_file():
                raise ILoRAError(f"replay buffer file {directory / name} is missing")
        try:
            state = json.loads((directory / STATE_FILE).read_text())
            tensors = load_file(str(directory / TENSORS_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
            raise ILoRAError(f"replay buffer in {directory} is unreadable ({err}); it is never unpickled") from None
        _check_saved(directory, state, tensors)
        if capacity is not None and capacity != state["capacity"]:
            raise ILoRAError(
                f"ilora_buffer_size={capacity} differs from the previous task's buffer capacity {state['capacity']} "
                f"({directory})"
            )
        buffer = cls(state["capacity"])
        sizes = tensors["lengths"].tolist()
        buffer.input_ids = list(torch.split(tensors["input_ids"], sizes))
        buffer.labels = list(torch.split(tensors["labels"], sizes))
        buffer.task_ids = list(state["task_ids"])
        keys = [k[len(EXTRA) :] for k in tensors if k.startswith(EXTRA)]
        columns = {k: torch.split(tensors[EXTRA + k], tensors[EXTRA_LENGTHS + k].tolist()) for k in keys}
        buffer.extras = [{k: columns[k][i] for k in keys} for i in range(len(sizes))]
        buffer.num_seen = state["num_seen"]
        version, internal, gauss = state["rng_state"]
        buffer._rng.setstate((version, tuple(internal), gauss))
        return buffer


def check_token_ids(buffer: ReplayBuffer, vocab_size: int, where: str) -> None:
    """Every stored token id (and label other than the ignored ones) is one the model has: an id past
    the vocabulary would index past the embedding table in the first replay step."""
    for ids, labels in zip(buffer.input_ids, buffer.labels):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        bad_labels = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))]
        if bad.numel() or bad_labels.numel():
            token = int((bad if bad.numel() else bad_labels)[0])
            raise ILoRAError(
                f"replay buffer of {where} holds token id {token}, beyond this model's vocabulary of "
                f"{vocab_size} (a buffer written for another model or tokenizer?)"
            )


def _check_saved(directory: Path, state, tensors: dict[str, torch.Tensor]) -> None:
    """The JSON and the tensors of a saved buffer describe the same rows (a crash or an edit can part them)."""

    def bad(what: str) -> ILoRAError:
        return ILoRAError(f"replay buffer in {directory} is inconsistent: {what}")

    if not isinstance(state, dict):
        raise bad(f"{STATE_FILE} is not a JSON object")
    for key, kind in (("capacity", int), ("num_seen", int), ("task_ids", list), ("rng_state", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"'{key}' in {STATE_FILE} is {state.get(key)!r}")
    rng = state["rng_state"]
    if len(rng) != 3 or not isinstance(rng[1], list) or not all(isinstance(v, int) for v in rng[1]):
        raise bad(f"'rng_state' in {STATE_FILE} is not a saved random state")
    try:
        random.Random().setstate((rng[0], tuple(rng[1]), rng[2]))  # what `load` will do, on a throwaway generator
    except (ValueError, TypeError, OverflowError) as err:
        raise bad(f"'rng_state' in {STATE_FILE} is not a saved random state ({err})") from None
    missing = sorted({"input_ids", "labels", "lengths"} - set(tensors))
    if missing:
        raise bad(f"{TENSORS_FILE} lacks {missing}")
    for key in ("input_ids", "labels", "lengths"):
        if tensors[key].is_floating_point() or tensors[key].is_complex() or tensors[key].dtype == torch.bool:
            raise bad(f"{TENSORS_FILE} holds {str(tensors[key].dtype).removeprefix('torch.')} token ids in '{key}'")
    lengths, rows = tensors["lengths"], len(state["task_ids"])
    if lengths.dim() != 1 or len(lengths) != rows:
        raise bad(f"{TENSORS_FILE} holds {lengths.numel()} rows, {STATE_FILE} names {rows}")
    if bool((lengths < 1).any()) or int(lengths.sum()) != tensors["input_ids"].numel():
        raise bad(f"row lengths do not add up to the {tensors['input_ids'].numel()} stored tokens")
    if tensors["labels"].shape != tensors["input_ids"].shape:
        raise bad("labels and input_ids differ in length")
    for key in [k[len(EXTRA) :] for k in tensors if k.startswith(EXTRA)]:
        sizes = tensors.get(EXTRA_LENGTHS + key)
        if sizes is None or len(sizes) != rows or int(sizes.sum()) != len(tensors[EXTRA + key]):
            raise bad(f"the stored '{key}' rows do not match the {rows} examples")
    if not 0 <= rows <= state["capacity"] or state["num_seen"] < rows:
        raise bad(f"{rows} rows with capacity {state['capacity']} after {state['num_seen']} examples seen")
