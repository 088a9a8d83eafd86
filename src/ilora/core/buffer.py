"""The replay buffer over every training example seen, across tasks, and what it keeps.

Examples are stored unpadded (token ids + labels + task id), with optional per-row tensors a method
keeps beside them (DER++'s logits, `extras`). Saving writes safetensors + JSON (no pickle), including
the RNG state and `num_seen`, so a chained task continues the same buffer.

The budget is in rows or in tokens (`unit`). What the buffer keeps (`policy`):
- `reservoir`: a uniform sample of every row seen. In rows, Vitter's algorithm R; in tokens, each row
  draws a random key and the rows of largest keys that fit are kept (a uniform sample, by priority).
- `balanced`: an equal share of the budget per task seen (shares differ by at most one unit, the
  earlier tasks taking the remainder); a row over budget is taken from the task furthest over its
  share (on a tie the later task), the row of smallest random key within it.
- `surprise`: the rows the model found hardest when they arrived (their mean token loss under the
  model of the step that trained on them, before its update); the least surprising row goes first, on
  a tie the later arrival. Shares are not kept per task.
A row larger than the whole budget is not kept. Rows are drawn for replay uniformly, whatever the policy.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ilora.data.encode import IGNORE_INDEX
from ilora.errors import ILoRAError
from ilora.files import finite_number, write_json


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(value) -> bool:
    return isinstance(value, str)


TENSORS_FILE = "buffer.safetensors"
STATE_FILE = "buffer.json"
EXTRA, EXTRA_LENGTHS = "extra.", "extra_lengths."  # tensor-name prefixes of the per-row extras


POLICIES = ("reservoir", "balanced", "surprise")
UNITS = ("rows", "tokens")


@dataclass(frozen=True)
class BufferSpec:
    """What a buffer is: its budget, in which unit, and what it keeps."""

    capacity: int
    policy: str = "reservoir"
    unit: str = "rows"


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0, policy: str = "reservoir", unit: str = "rows"):
        if capacity < 0:
            raise ILoRAError(f"buffer capacity {capacity} must be >= 0")
        if policy not in POLICIES or unit not in UNITS:
            raise ILoRAError(f"replay policy {policy!r} in {unit!r}: the policies are {POLICIES}, the units {UNITS}")
        self.capacity = capacity
        self.policy, self.unit = policy, unit
        self.num_seen = 0
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.task_ids: list[str] = []
        self.extras: list[dict[str, torch.Tensor]] = []  # per row; the same keys in every row, or none
        # each row's rank (a random key, or its surprise) and arrival (num_seen when it came), and every
        # task that offered a row, in order; unused by algorithm R (reservoir in rows)
        self.priorities: list[float] = []
        self.arrivals: list[int] = []
        self.tasks_seen: list[str] = []
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def algorithm_r(self) -> bool:
        return self.policy == "reservoir" and self.unit == "rows"

    @property
    def wants_surprise(self) -> bool:
        """`add` needs each row's loss on arrival."""
        return self.policy == "surprise" and self.capacity > 0

    def add(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        task_id: str = "",
        extras: dict[str, torch.Tensor] | None = None,
        surprise: float | None = None,
    ) -> None:
        """Offer one row; what is kept follows the policy (see the module's docstring)."""
        self.num_seen += 1
        if self.capacity == 0:
            return
        if self.algorithm_r:  # after n examples each is kept with probability capacity/n
            slot = len(self) if len(self) < self.capacity else self._rng.randrange(self.num_seen)
            if slot < self.capacity:
                self._put(slot, input_ids, labels, task_id, extras)
            return
        if self.policy == "surprise" and surprise is None:
            raise ILoRAError("the surprise replay policy needs each row's loss when it arrives")
        if task_id not in self.tasks_seen:
            self.tasks_seen.append(task_id)
        if self._size(input_ids) > self.capacity:
            return
        self._put(len(self), input_ids, labels, task_id, extras)
        self.priorities.append(float(surprise) if self.policy == "surprise" else self._rng.random())
        self.arrivals.append(self.num_seen)
        while self.used() > self.capacity:
            self._remove(self._victim())

    def _put(self, slot: int, input_ids, labels, task_id: str, extras) -> None:
        row = (input_ids, labels, task_id, extras or {})
        for column, value in zip((self.input_ids, self.labels, self.task_ids, self.extras), row):
            if slot == len(column):
                column.append(value)
            else:
                column[slot] = value

    def _remove(self, index: int) -> None:
        for column in (self.input_ids, self.labels, self.task_ids, self.extras, self.priorities, self.arrivals):
            del column[index]

    def _size(self, input_ids: torch.Tensor) -> int:
        return 1 if self.unit == "rows" else len(input_ids)

    def used(self) -> int:
        """The budget the stored rows take, in the buffer's unit."""
        return sum(self._size(ids) for ids in self.input_ids)

    def _victim(self) -> int:
        """The stored row to drop: the lowest priority (within the task furthest over its share, when
        balanced); on a tie, the later arrival."""
        rows = range(len(self))
        if self.policy == "balanced":
            task = self._most_over_share()
            rows = [i for i in rows if self.task_ids[i] == task]
        return min(rows, key=lambda i: (self.priorities[i], -self.arrivals[i]))

    def shares(self) -> dict[str, int]:
        """Each task's share of the budget under `balanced`: equal, the remainder to the earlier tasks."""
        count = len(self.tasks_seen)
        return {task: self.capacity // count + (k < self.capacity % count) for k, task in enumerate(self.tasks_seen)}

    def _most_over_share(self) -> str:
        usage = dict.fromkeys(self.tasks_seen, 0)
        for ids, task in zip(self.input_ids, self.task_ids):
            usage[task] += self._size(ids)
        shares = self.shares()
        # the largest excess; on a tie the later task (max keeps the last of equal keys by enumerate order)
        return max(enumerate(self.tasks_seen), key=lambda kt: (usage[kt[1]] - shares[kt[1]], kt[0]))[1]

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
            "policy": self.policy,
            "unit": self.unit,
            "num_seen": self.num_seen,
            "task_ids": self.task_ids,
            "rng_state": [version, list(internal), gauss],
        }
        if not self.algorithm_r:
            state.update(priorities=self.priorities, arrivals=self.arrivals, tasks_seen=self.tasks_seen)
        write_json(directory / STATE_FILE, state, indent=None)

    @classmethod
    def create(cls, spec: BufferSpec, seed: int) -> ReplayBuffer:
        return cls(spec.capacity, seed=seed, policy=spec.policy, unit=spec.unit)

    def spec(self) -> BufferSpec:
        return BufferSpec(self.capacity, self.policy, self.unit)

    @classmethod
    def load(cls, directory: str | Path, spec: BufferSpec | None = None) -> ReplayBuffer:
        """Load a saved buffer, checking that its two files agree. A `spec` other than the saved one is
        refused: a different budget, unit or policy would change what the buffer holds."""
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
        saved = BufferSpec(state["capacity"], state.get("policy", "reservoir"), state.get("unit", "rows"))
        if spec is not None and spec != saved:
            raise ILoRAError(
                f"this task's replay buffer ({_described(spec)}) differs from the previous task's ({_described(saved)}, "
                f"{directory}): ilora_buffer_size, replay_budget_tokens and replay_policy stay as the sequence began"
            )
        buffer = cls.create(saved, seed=0)  # the saved random state replaces the seed's
        sizes = tensors["lengths"].tolist()
        buffer.input_ids = list(torch.split(tensors["input_ids"], sizes))
        buffer.labels = list(torch.split(tensors["labels"], sizes))
        buffer.task_ids = list(state["task_ids"])
        keys = [k[len(EXTRA) :] for k in tensors if k.startswith(EXTRA)]
        columns = {k: torch.split(tensors[EXTRA + k], tensors[EXTRA_LENGTHS + k].tolist()) for k in keys}
        buffer.extras = [{k: columns[k][i] for k in keys} for i in range(len(sizes))]
        buffer.num_seen = state["num_seen"]
        if not buffer.algorithm_r:
            buffer.priorities = [float(p) for p in state["priorities"]]
            buffer.arrivals, buffer.tasks_seen = list(state["arrivals"]), list(state["tasks_seen"])
        version, internal, gauss = state["rng_state"]
        buffer._rng.setstate((version, tuple(internal), gauss))
        return buffer


def _described(spec: BufferSpec) -> str:
    return f"{spec.policy}, {spec.capacity} {spec.unit}"


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
    if state.get("policy", "reservoir") not in POLICIES or state.get("unit", "rows") not in UNITS:
        raise bad(f"policy {state.get('policy')!r} in {state.get('unit')!r} is not one ilora writes")
    if (state.get("policy", "reservoir"), state.get("unit", "rows")) != ("reservoir", "rows"):
        rows = len(state.get("task_ids") or [])
        for key, valid in (("priorities", finite_number), ("arrivals", _count), ("tasks_seen", _text)):
            values = state.get(key)
            if not isinstance(values, list) or (key != "tasks_seen" and len(values) != rows):
                raise bad(f"'{key}' in {STATE_FILE} is not one entry per stored row")
            if not all(valid(v) for v in values):
                raise bad(f"'{key}' in {STATE_FILE} holds {next(v for v in values if not valid(v))!r}")
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
