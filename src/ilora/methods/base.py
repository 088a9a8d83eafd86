"""The interface every continual-learning method keeps, and what the methods share.

A method is one class in one module of `ilora.methods`, registered by one line in its `__init__`, with
its own options dataclass (`Arguments`) beside it. `ILoRATrainer` (any method; the name is the
library's) calls it in this order:

  prepare_model(model, previous, args, options)   classmethod, once per task, before training: the
        trainer has put the trainable `plastic` adapter on the model (fresh, or the previous task's);
        the method adds what else it needs (a stable copy, a frozen teacher, frozen earlier LoRAs).
        `previous` maps adapter names to the previous task's saved adapter directories ({} at first).
  Method(model, args, options, ...)                 the trainer's model, after `prepare_model`
  trainable(pair) -> [tensors]                      which plastic tensors the optimizer trains (all of
                                                    them by default; the rest stay frozen)
  load_state(tensors, record)                       the previous task's saved method state, if any
  start_of_task(batches)                            once, before the first optimizer step, with the
                                                    task's rows (not again on a resume: its effects
                                                    are in the checkpoint)
  seed_replay(batches)                              instead of training: an adapter trained elsewhere
                                                    starts a run, its rows go into the replay buffer
  loss(batch, forward)                              every micro-batch: the loss to backpropagate
  after_optimizer_step()                            after every optimizer step
  end_of_task(batches)                              once, after the last step
  state() -> (tensors, record)                      what goes into the task directory and checkpoints
                                                    (safetensors + JSON; never pickle)

and, as classmethods that need no trained model:

  evaluated(model, options) -> {report: [adapters]} what evaluation scores, and which adapters are
                                                    summed in that forward
  merged_weights(model, report, options)            None when `report`'s model is that sum of adapters;
                                                    else {module: dense weight change} that evaluation
                                                    adds to the base weights and `export --merge` folds in
  saved_adapters(options, previous) -> [names]      adapters written as PEFT directories
  adapter_locations(output_dir, options, chained)   where some of them go, if not output_dir/<name>
  previous_adapter_locations(options)               where a chained task reads some of them instead

Which kinds of method fit which hooks:
- a loss term on the current rows (EWC, LwF, DER++, O-LoRA's orthogonality): `loss`, with
  `end_of_task` for statistics of the finished task (EWC's Fisher) and `state`/`load_state` to carry them;
- an update after each step (I-LoRA's EMA of the stable adapter): `after_optimizer_step`;
- extra frozen adapters summed in the forward (O-LoRA's earlier tasks, I-LoRA's stable one): add them in
  `prepare_model`, name them in `evaluated` and `saved_adapters`;
- adapters designed from the new task's data before training (InfLoRA's down-projections):
  `start_of_task`, and `trainable` to train part of the plastic adapter only (InfLoRA's B);
- an evaluated model that is not a sum of adapters (MagMax's per-parameter maximum-magnitude merge of
  task vectors): `merged_weights`.

The optimizer trains the `trainable` plastic tensors and nothing else (the trainer checks it); every
other adapter a method adds is frozen. Under FSDP2 the parameters are this rank's slices: a term
computed on them outside the forward takes them `sharding.whole` (O-LoRA's, EWC's penalties), and
gradients reach them only through the model's backward (EWC's Fisher); such a method sets
`uses_whole_parameters`, and is refused under DeepSpeed ZeRO-3. Shared here: the reservoir buffer (for
methods that replay), the finite flag that watches for divergence without a host sync per step, the
end-of-task collapse check, and logging means.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel

from ilora.config.arguments import ContinualArguments
from ilora.core.adapters import PLASTIC, AdapterPair, weights_added
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import IGNORE_INDEX, pad_rows
from ilora.errors import ILoRAError, TrainingDiverged
from ilora.runtime import distributed

# An exploded adapter: a weight beyond this magnitude. LoRA weights start below 1 and stay there; past
# 1e6 a low-rank update outweighs its base matrix by orders of magnitude, whatever its outputs still do.
EXPLODED_WEIGHT = 1e6
# A collapsed model: its logits vary across positions by less than this share of their magnitude ...
COLLAPSE_SPREAD = 1e-3
# ... or its loss on the rows it was just trained on is this many nats above both the untrained model's
# and a uniform guess's (a trained model scores its own training rows better than either).
COLLAPSE_MARGIN = 1.0


class Method:
    name: ClassVar[str] = ""
    Arguments: ClassVar[type | None] = None  # the method's own options (a dataclass), if any
    replays: ClassVar[bool] = False  # draws rows from the replay buffer (with a budget > 0)
    trains_jointly: ClassVar[bool] = False  # one stage over every task's data (the upper bound)
    # computes a term on whole adapter matrices outside the forward (EWC's, O-LoRA's penalties): FSDP2 can
    # gather them differentiably (`sharding.whole`), DeepSpeed ZeRO-3 cannot (policy refuses it there)
    uses_whole_parameters: ClassVar[bool] = False
    # evaluates base weights plus dense changes (`merged_weights`, MagMax): the base must be whole, so FSDP2
    # and DeepSpeed ZeRO-3, which hold it in slices, refuse the method
    merges_into_base: ClassVar[bool] = False

    # --------------------------------------------- what the method is, before any model exists
    @classmethod
    def uses_replay(cls, args: ContinualArguments) -> bool:
        return cls.replays and args.replay_budget()[0] > 0

    @classmethod
    def evaluated(cls, model: PeftModel | None, options) -> dict[str, list[str]]:
        """What evaluation scores: {report: adapters summed in that forward}. `model` may be None (the
        names reports are known by, before any model exists)."""
        return {PLASTIC: [PLASTIC]}

    @classmethod
    def reports(cls, options) -> list[str]:
        """The names evaluation reports under (known before any model exists). On a tie in a run's
        accuracy, export prefers the last."""
        return list(cls.evaluated(None, options))

    @classmethod
    def merged_weights(cls, model: PeftModel, report: str, options) -> dict[str, torch.Tensor] | None:
        """None: `report`'s model is the sum of the adapters `evaluated` names. Otherwise the dense change
        of each adapted module's weight ({module name: tensor shaped like its base weight}) that
        evaluation adds to the base weights (adapters off) and `export --merge` folds in."""
        return None

    @classmethod
    def saved_adapters(cls, options, previous: Sequence[str]) -> list[str]:
        """The adapters a task writes as PEFT directories, given the names its previous task saved."""
        return [PLASTIC]

    @classmethod
    def adapter_locations(cls, output_dir: Path, options, chained: bool) -> dict[str, Path]:
        """Where saved adapters go when not `output_dir/<name>` (I-LoRA's stable one: ema_adapter_path)."""
        return {}

    @classmethod
    def previous_adapter_locations(cls, options) -> dict[str, Path]:
        """Where a chained task reads some of the previous task's adapters instead of where they were
        saved (I-LoRA's stable one: ema_adapter_path)."""
        return {}

    # ----------------------------------------------------------- set-up
    @classmethod
    def prepare_model(cls, model: PeftModel, previous: dict, args: ContinualArguments, options) -> None:
        """Add the adapters the method needs besides `plastic` (none by default)."""

    def trainable(self, pair: AdapterPair) -> list[torch.nn.Parameter]:
        """The plastic tensors the optimizer trains (every one by default); the others stay frozen. A
        function of `pair` alone: it is called again whenever the tensors are paired anew."""
        return pair.plastic

    def __init__(
        self,
        model: PeftModel,
        args: ContinualArguments,
        options=None,
        pad_token_id: int = 0,
        replay_batch_size: int = 1,
        buffer: ReplayBuffer | None = None,
        step: int = 0,
        task_id: str = "",
    ):
        self.model = model
        self.args = args
        self.options = options if options is not None else (self.Arguments() if self.Arguments else None)
        self.pad_token_id = pad_token_id
        self.replay_batch_size = replay_batch_size
        self.task_id = task_id
        self.step = step  # optimizer steps since the first task began, carried across tasks
        self.pair_adapters()
        if self.uses_replay(args) and buffer is None:
            raise ILoRAError(f"method {self.name} with a replay budget needs a ReplayBuffer")
        self.buffer = buffer if self.uses_replay(args) else None
        self.device = self.adapters.plastic[0].device
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        # the whole task's loss, across resumes (checkpoints carry it): the manifest's train_loss
        self._task_loss_sum = torch.zeros((), device=self.device)
        self._task_micro_batches = 0
        self._rows_replayed = 0  # the task's replayed rows, every rank's (a host count: no sync)
        # (input_ids, attention_mask, labels) of the last trained micro-batch: the end-of-task collapse check
        self._last_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.collapse_figures: dict[str, float | torch.Tensor] = {}
        self._reset_stats()

    def restore(self, step: int, buffer: ReplayBuffer | None, task_loss: dict) -> None:
        """Continue from a checkpoint: the Trainer has reloaded the adapters, so pair them again.
        `task_loss`: the checkpoint's `task_loss()`."""
        if self.uses_replay(self.args) and buffer is None:
            raise ILoRAError("the checkpoint holds no replay buffer, but this run uses one")
        self.step = step
        self.buffer = buffer
        self._task_loss_sum = torch.tensor(float(task_loss["sum"]), device=self.device)
        self._task_micro_batches = int(task_loss["micro_batches"])
        self._rows_replayed = int(task_loss.get("rows_replayed", 0))
        self.pair_adapters()

    def pair_adapters(self) -> None:
        """Find the adapter tensors (again: the Trainer reloaded them, FSDP2 sharded them, or DeepSpeed cast
        them to bf16, and the stable one goes back to fp32); only the `trainable` ones require grad."""
        self.adapters = AdapterPair(self.model)
        self.adapters.stable_in_fp32()
        trained = {id(t) for t in self.trainable(self.adapters)}
        for tensor in self.adapters.plastic:
            tensor.requires_grad_(id(tensor) in trained)

    def trained_tensors(self) -> list[torch.nn.Parameter]:
        """The tensors the optimizer holds: `trainable` of the current pairing."""
        return self.trainable(self.adapters)

    # ------------------------------------------------------------ hooks
    def loss(self, batch: dict, forward: torch.nn.Module | None = None) -> torch.Tensor:
        """Loss of one micro-batch. `forward` is the module the trained pass goes through: the model,
        or its DDP wrapper (whose forward prepares the gradient all-reduce)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        self.step += 1

    def start_of_task(self, batches) -> None:
        """Before the first optimizer step of a task, with its rows (file order, the same on every rank)."""

    @torch.no_grad()
    def seed_replay(self, batches) -> None:
        """Rows an adapter trained elsewhere was trained on, into the replay buffer (`start_from_data`), as
        if this method had trained on them: what it keeps beside a row is computed on the current model."""
        for batch in batches:
            ids, labels = split_rows(batch)
            surprise = None
            if self.buffer is not None and self.buffer.wants_surprise:
                outputs, padded, _ = self.forward_rows(None, ids, labels)
                surprise = self.surprise(outputs.logits, padded, len(ids))
            self.remember(ids, labels, surprise=surprise, shard=False)

    def end_of_task(self, batches) -> None:
        """After the last optimizer step, before the task is written."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """The previous task's `state()`."""

    # ------------------------------------------------------ shared parts
    def forward_rows(self, forward, ids, labels, **kwargs):
        """Pad rows, run the trained forward, remember the batch for the end-of-task output check."""
        input_ids, padded_labels, attention_mask = pad_rows(ids, labels, self.pad_token_id)
        self._last_batch = (input_ids, attention_mask, padded_labels)
        outputs = (forward or self.model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return outputs, padded_labels, attention_mask

    def current_rows_loss(self, batch: dict, forward=None):
        """Cross-entropy of the micro-batch's own rows through the trained forward, logged as ce_loss.
        Returns the loss, the model outputs, the padded labels and the attention mask."""
        ids, labels = split_rows(batch)
        outputs, labels, attention_mask = self.forward_rows(forward, ids, labels)
        ce = causal_lm_loss(outputs.logits, labels, across_ranks=True)
        self.record("ce_loss", ce)
        return ce, outputs, labels, attention_mask

    def draw_replay(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ids, labels, _ = self.draw_rows(device)
        return ids, labels

    def draw_rows(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict]]:
        """This rank's share of one replay draw for the global micro-batch (`replay_batch_size` rows per
        rank): every rank holds the same buffer and draws the same rows, and takes its part of them.
        Token ids, labels and what the method keeps beside each row, on `device`."""
        if self.buffer is None or len(self.buffer) == 0:
            return [], [], []
        ids, labels, extras = self.buffer.sample(self.replay_batch_size * distributed.world_size())
        self._rows_replayed += len(ids)
        ids, labels, extras = (distributed.share_of(column) for column in (ids, labels, extras))
        return (
            [t.to(device, non_blocking=True) for t in ids],
            [t.to(device, non_blocking=True) for t in labels],
            [{k: v.to(device, non_blocking=True) for k, v in row.items()} for row in extras],
        )

    def remember(
        self,
        ids: list[torch.Tensor],
        labels: list[torch.Tensor],
        extras: list[dict] | None = None,
        surprise: list[float] | None = None,
        shard: bool = True,
    ) -> None:
        """Offer the rows to the buffer (`surprise`: their losses, for the surprise policy). `shard`: the
        rows are this rank's share of a training micro-batch, gathered from every rank first so that
        every rank's buffer takes the whole batch in one process's order (False: every rank already
        holds every row, as when seeding the buffer)."""
        if self.buffer is None:
            return
        if shard and distributed.active():
            ids, labels, extras, surprise = _gathered(ids, labels, extras, surprise)
        for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            # clone: a view would keep the whole padded batch alive in the buffer
            extra = {k: v.detach().clone() for k, v in extras[i].items()} if extras else None
            loss = None if surprise is None else surprise[i]
            self.buffer.add(row_ids.detach().clone(), row_labels.detach().clone(), self.task_id, extra, loss)

    def surprise(self, logits: torch.Tensor, labels: torch.Tensor, rows: int) -> list[float] | None:
        """The first `rows` rows' mean token losses, on the host, when the buffer keeps rows by surprise
        (one device-to-host read per micro-batch, which the other policies never make); else None."""
        if self.buffer is None or not self.buffer.wants_surprise:
            return None
        with torch.no_grad():
            return row_losses(logits[:rows], labels[:rows]).tolist()

    def record(self, name: str, value: torch.Tensor) -> None:
        """Add a loss term to the logged means (on the device; read at the log interval only)."""
        self._stats[name] = self._stats.get(name, 0.0) + value.detach()

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """And the loss into the finite flag (no host sync) and count the micro-batch."""
        self._finite &= torch.isfinite(loss.detach())
        self._micro_batches += 1
        self._task_loss_sum += loss.detach().float()
        self._task_micro_batches += 1
        return loss

    @property
    def rows_replayed(self) -> int:
        """Replay rows drawn since the task began (every rank's share together), resumes included."""
        return self._rows_replayed

    def task_loss(self) -> dict:
        """Sum and count of the task's micro-batch losses since it began, resumes included (the sum
        averaged over ranks), and the rows it replayed. A collective with a host sync: checkpoints and
        the end of a task only."""
        total = distributed.mean_(self._task_loss_sum.detach().clone())
        return {"sum": float(total), "micro_batches": self._task_micro_batches, "rows_replayed": self._rows_replayed}

    # ------------------------------------------------------------ divergence
    def check_diverged(self, when: str, adapters: bool = False, outputs: bool = False) -> None:
        """Raise `TrainingDiverged` if a loss since the start was NaN or inf; with `adapters`, if an
        adapter weight is, or has exploded past `EXPLODED_WEIGHT`; with `outputs`, if an evaluated model has collapsed on the last micro-batch
        (see `_collapse_flags`). Reads back to the host, agreed by every rank: call at the log
        interval, at checkpoints and at the end of a task, never per step."""
        checks = {"a loss or adapter weight became NaN or inf": [self._finite]}
        if adapters:
            checks["a loss or adapter weight became NaN or inf"] += self.adapters.finite_flags()
            checks[f"an adapter weight grew past {EXPLODED_WEIGHT:g}"] = self.adapters.bounded_flags(EXPLODED_WEIGHT)
        if outputs and self._last_batch is not None:
            checks.update(self._collapse_flags(*self._last_batch))
        true = torch.ones((), dtype=torch.bool, device=self.device)
        passed = torch.stack([torch.stack([true, *flags]).all() for flags in checks.values()]).float()
        passed = distributed.mean_(passed).tolist()  # every rank takes the same decision
        failed = [reason for reason, share in zip(checks, passed) if share < 1.0]
        if failed:
            raise TrainingDiverged(
                f"training diverged {when}: {'; '.join(failed)} (lower learning_rate, set max_grad_norm, "
                "check the method's loss weights); the task is not marked finished"
            )

    @torch.no_grad()
    def _collapse_flags(self, input_ids, attention_mask, labels) -> dict[str, list[torch.Tensor]]:
        """One flag per check and evaluated model (True: healthy), on the batch it was just trained on.

        Weights blown up to 1e25 are finite; their logits may be inf (on some CPUs' kernels), saturate
        to one constant row (under bf16, or other kernels), or just be wrong. So each evaluated model must
        give finite logits that still depend on the input, and a loss on its own training rows no worse
        than both the untrained model's and a uniform guess over the vocabulary, by `COLLAPSE_MARGIN`
        nats. The figures go to the task's manifest (`collapse_check`), where real runs show their margins."""
        with self.model.disable_adapter():
            base_logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        base_loss = causal_lm_loss(base_logits, labels)
        uniform_loss = math.log(base_logits.shape[-1])
        del base_logits
        ceiling = torch.clamp(base_loss, min=uniform_loss) + COLLAPSE_MARGIN
        checks: dict[str, list[torch.Tensor]] = {}
        figures = {"untrained_loss": base_loss, "uniform_loss": uniform_loss}
        for report in self.evaluated(self.model, self.options):
            with evaluating(type(self), self.model, report, self.options):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = causal_lm_loss(logits, labels)
            figures[f"{report}_loss"] = loss
            checks[f"the {report} model's logits are NaN or inf"] = [torch.isfinite(logits).all()]
            checks[f"the {report} model's outputs no longer depend on its input"] = [varies(logits, attention_mask)]
            checks[f"the {report} model's loss on its training rows is far above the untrained model's"] = [
                ~(loss > ceiling)  # NaN is the finite check's to report
            ]
        self.collapse_figures = figures
        return checks

    # ------------------------------------------------------------- logging
    def _reset_stats(self) -> None:
        self._stats: dict[str, torch.Tensor | float] = {}
        self._micro_batches = 0

    def pop_logs(self) -> dict[str, float]:
        """Means per micro-batch since the last call. Reads back to the host: the log interval only."""
        self.check_diverged(f"by optimizer step {self.step}")
        logs = {}
        if self._micro_batches:
            logs = {k: float(v / self._micro_batches) for k, v in self._stats.items()}
        self._reset_stats()
        return logs


@contextlib.contextmanager
def evaluating(method_cls, model: PeftModel, report: str, options) -> Iterator[None]:
    """Within this, `model`'s forward is `report`'s evaluated model: the adapters `evaluated` names,
    summed, or (`merged_weights`) the base weights with the method's dense changes added, adapters off.
    Scoring, the collapse check and `ilora eval` all go through here."""
    changes = method_cls.merged_weights(model, report, options)
    if changes is None:
        with AdapterPair(model).active(method_cls.evaluated(model, options)[report]):
            yield
    else:
        with weights_added(model, changes):
            yield


def varies(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """0-dim bool: do the logits differ across the batch's real positions by more than
    `COLLAPSE_SPREAD` of their largest magnitude? (Any two positions have different prefixes; a trained
    model's logits differ by whole units. One position alone, or NaN, counts as varying.)"""
    rows = logits[attention_mask.bool()]
    if rows.shape[0] < 2:
        return torch.ones((), dtype=torch.bool, device=logits.device)
    spread = (rows - rows[:1]).abs().amax().float()
    return ~(spread <= COLLAPSE_SPREAD * rows.abs().amax().float())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, across_ranks: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (the same reduction as transformers).
    `across_ranks`: the mean over every rank's micro-batch, as this rank's share (a training loss: the
    same gradient as one process with the global batch)."""
    labels = shift_labels(labels)
    if across_ranks and distributed.active():
        total = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return distributed.share_of_mean(total, (labels != IGNORE_INDEX).sum())
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its labelled tokens (0 for a row without any)."""
    targets = shift_labels(labels)
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position i predicts token i + 1)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def split_rows(batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The unpadded rows of a right-padded batch. `lengths` (host ints from the collator) avoids a sync."""
    lengths = batch.get("lengths")
    if lengths is None:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
    ids, labels = batch["input_ids"], batch["labels"]
    return [ids[i, :n] for i, n in enumerate(lengths)], [labels[i, :n] for i, n in enumerate(lengths)]


def _gathered(ids, labels, extras, surprise):
    """Every rank's rows, extras and surprises, in rank order (`distributed.gather_rows`)."""
    # one row of ids then labels (the same length) per example: one gather for both
    rows = distributed.gather_rows([torch.cat([i, lab.to(i.dtype)]) for i, lab in zip(ids, labels)])
    ids, labels = [r[: len(r) // 2] for r in rows], [r[len(r) // 2 :] for r in rows]
    total = len(rows)
    if extras:
        columns = {}
        for key in extras[0]:
            values = [row[key] for row in extras]
            flat = distributed.gather_rows([v.flatten() for v in values])
            columns[key] = [f.view(-1, *values[0].shape[1:]) for f in flat]
        extras = [{key: columns[key][i] for key in columns} for i in range(total)]
    if surprise is not None:
        device = ids[0].device
        losses = distributed.gather_rows([torch.tensor(surprise, dtype=torch.float64, device=device)])
        surprise = torch.cat(losses).tolist()
    return ids, labels, extras, surprise
