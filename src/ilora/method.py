"""I-LoRA, one training step at a time (Ren et al., arXiv 2402.18865).

Per micro-batch:
  1. draw replay rows from the reservoir buffer, then add the current rows to it;
  2. stable pass, no grad: hidden states of the replay rows (and, with selective update, the stable
     adapter's loss on the whole batch);
  3. plastic pass, with grad, over current + replay rows: cross-entropy and the same hidden states;
  4. loss = CE + consistency_weight * MSE(plastic hidden, stable hidden) over non-padding replay tokens.
After each optimizer step:
  5. stable <- a * stable + (1 - a) * plastic,  a = min(1 - 1/(t+1), ema_alpha),  t = optimizer steps
     since the first task began (carried across tasks).

Two forward passes, one of them without grad and without the LM head. Nothing here reads a value
back to the host: statistics stay on the device until `pop_logs()` is called at the log interval.
Divergence is watched the same way: every loss is and-ed into a finite flag on the device, and
`check_finite()` (log interval, checkpoints, end of task) raises `TrainingDiverged` once it is false.
This module knows no Trainer; `ILoRATrainer` drives it, benchmarks and tests call it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel

from . import distributed
from .adapters import PLASTIC, STABLE, AdapterPair
from .buffer import ReplayBuffer
from .config import ILoRAArguments
from .data import IGNORE_INDEX, pad_rows
from .errors import ILoRAError, TrainingDiverged


class ILoRA:
    def __init__(
        self,
        model: PeftModel,
        args: ILoRAArguments,
        pad_token_id: int,
        replay_batch_size: int,
        buffer: ReplayBuffer | None = None,
        step: int = 0,
        task_id: str = "",
    ):
        self.model = model
        self.args = args
        self.pad_token_id = pad_token_id
        self.replay_batch_size = replay_batch_size
        self.task_id = task_id
        self.step = step
        self.adapters = AdapterPair(model)
        if args.uses_stable and not self.adapters.has_stable:
            raise ILoRAError("I-LoRA needs a stable adapter on the model (see ilora.adapters.attach_adapters)")
        if args.uses_replay and buffer is None:
            raise ILoRAError("I-LoRA with ilora_buffer_size > 0 needs a ReplayBuffer")
        self.buffer = buffer if args.uses_replay else None
        self.layers = check_hidden_state_layers(model, args.hidden_state_layers)
        self.decoder = model.get_base_model().get_decoder()
        device = self.adapters.plastic[0].device
        # selective update: plastic and stable losses summed over the micro-batches of one optimizer step
        self._selective_plastic = torch.zeros((), device=device)
        self._selective_stable = torch.zeros((), device=device)
        self._selective_micro = 0
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # for the end-of-task output check
        self._reset_stats()

    def restore(self, step: int, buffer: ReplayBuffer | None) -> None:
        """Continue from a checkpoint: the Trainer has reloaded both adapters, so pair them again."""
        if self.args.uses_replay and buffer is None:
            raise ILoRAError("the checkpoint holds no replay buffer, but this run uses one")
        self.step = step
        self.buffer = buffer
        self.adapters = AdapterPair(self.model)

    # ---------------------------------------------------------------- the step
    def loss(self, batch: dict, forward: torch.nn.Module | None = None) -> torch.Tensor:
        """Loss of one micro-batch (right-padded `input_ids`, `labels`, `attention_mask`, `lengths`).

        `forward` is the module the plastic pass goes through: the model itself, or its DDP wrapper
        (whose forward prepares the gradient all-reduce)."""
        current_ids, current_labels = split_rows(batch)
        replay_ids, replay_labels = self._draw_replay(device=batch["input_ids"].device)
        self._remember(current_ids, current_labels)

        input_ids, labels, attention_mask = pad_rows(
            current_ids + replay_ids, current_labels + replay_labels, self.pad_token_id
        )
        self._last_batch = (input_ids, attention_mask)
        num_current = len(current_ids)
        replay_len = max((len(row) for row in replay_ids), default=0)
        wants_consistency = bool(replay_ids) and self.args.uses_stable and self.args.consistency_weight > 0
        selective = self.args.uses_stable and self.args.selective_update

        stable_hidden = None
        if selective:
            stable_hidden = self._stable_pass_full(input_ids, labels, attention_mask, num_current, replay_len)
        elif wants_consistency:
            stable_hidden = self._stable_pass_replay(input_ids, attention_mask, num_current, replay_len)

        outputs = (forward or self.model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.layers if wants_consistency else False,
        )
        ce = causal_lm_loss(outputs.logits, labels)
        loss = ce
        if wants_consistency:
            plastic_hidden = [outputs.hidden_states[i][num_current:, :replay_len] for i in self.layers]
            mask = attention_mask[num_current:, :replay_len]
            consistency = consistency_loss(plastic_hidden, stable_hidden, mask)
            loss = ce + self.args.consistency_weight * consistency
            self._stats["consistency_loss"] += consistency.detach()
        self._finite &= torch.isfinite(loss.detach())
        self._stats["ce_loss"] += ce.detach()
        self._stats["micro_batches"] += 1
        if selective:
            self._selective_plastic += ce.detach()
            self._selective_micro += 1
        return loss

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The EMA step. Call once per optimizer step, after `optimizer.step()`."""
        self.step += 1
        if not self.args.uses_stable:
            return
        weight = 1.0 - ema_coefficient(self.step, self.args.ema_alpha)
        if self.args.selective_update and self._selective_micro:
            # every rank takes the same decision, or the stable adapters would drift apart
            losses = distributed.mean_(torch.stack([self._selective_plastic, self._selective_stable]))
            plastic, stable = losses / self._selective_micro
            apply = (stable - plastic >= self.args.min_update_threshold).to(self.adapters.plastic[0].dtype)
            self._stats["ema_skipped"] += 1.0 - apply
            self._stats["ema_steps"] += 1
            self.adapters.ema_(apply * weight)
            self._selective_plastic.zero_()
            self._selective_stable.zero_()
            self._selective_micro = 0
        else:
            self.adapters.ema_(weight)

    # ----------------------------------------------------------- the passes
    @torch.no_grad()
    def _stable_pass_replay(self, input_ids, attention_mask, num_current, replay_len) -> list[torch.Tensor]:
        """Stable hidden states of the replay rows only, through the decoder (no LM head)."""
        with self.adapters.active(STABLE):
            out = self.decoder(
                input_ids=input_ids[num_current:, :replay_len],
                attention_mask=attention_mask[num_current:, :replay_len],
                output_hidden_states=self.layers,
            )
        return [out.hidden_states[i] for i in self.layers]

    @torch.no_grad()
    def _stable_pass_full(self, input_ids, labels, attention_mask, num_current, replay_len):
        """Selective update: the stable loss on the whole batch, and the replay rows' hidden states."""
        with self.adapters.active(STABLE):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layers)
        self._selective_stable += causal_lm_loss(out.logits, labels)
        return [out.hidden_states[i][num_current:, :replay_len] for i in self.layers]

    # ---------------------------------------------------------------- replay
    def _draw_replay(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.buffer is None or len(self.buffer) == 0:
            return [], []
        ids, labels = self.buffer.sample(self.replay_batch_size)
        return [t.to(device, non_blocking=True) for t in ids], [t.to(device, non_blocking=True) for t in labels]

    def _remember(self, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        if self.buffer is None:
            return
        for row_ids, row_labels in zip(ids, labels):
            # clone: a view would keep the whole padded batch alive in the buffer
            self.buffer.add(row_ids.detach().clone(), row_labels.detach().clone(), self.task_id)

    # ------------------------------------------------------------ divergence
    def check_finite(self, when: str, adapters: bool = False, outputs: bool = False) -> None:
        """Raise `TrainingDiverged` if a loss since the start was NaN or inf (with `adapters`, if an
        adapter weight is; with `outputs`, if an adapter's logits on the last micro-batch are: weights
        blown up to 1e25 are finite, their logits are not). Reads back to the host, agreed by every
        rank: call at the log interval, at checkpoints and at the end of a task, never per step."""
        flags = [self._finite]
        if adapters:
            flags += [torch.isfinite(t).all() for t in self.adapters.plastic + self.adapters.stable]
        if outputs and self._last_batch is not None:
            flags += self._outputs_finite(*self._last_batch)
        ok = distributed.mean_(torch.stack(flags).all().float())  # every rank takes the same decision
        if ok.item() < 1.0:
            raise TrainingDiverged(
                f"training diverged {when}: a loss or adapter weight became NaN or inf (lower learning_rate, "
                "set max_grad_norm, check consistency_weight); the task is not marked finished"
            )

    @torch.no_grad()
    def _outputs_finite(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        names = [PLASTIC, STABLE] if self.args.uses_stable else [PLASTIC]
        flags = []
        for name in names:
            with self.adapters.active(name):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            flags.append(torch.isfinite(logits).all())
        return flags

    # ------------------------------------------------------------- logging
    def _reset_stats(self) -> None:
        device = self.adapters.plastic[0].device
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self._stats = {
            "ce_loss": zero(),
            "consistency_loss": zero(),
            "micro_batches": 0,
            "ema_skipped": zero(),
            "ema_steps": 0,
        }

    def pop_logs(self) -> dict[str, float]:
        """Means since the last call. Reads values back to the host: call at the log interval only."""
        self.check_finite(f"by optimizer step {self.step}")
        stats, logs = self._stats, {}
        if stats["micro_batches"]:
            logs["ce_loss"] = (stats["ce_loss"] / stats["micro_batches"]).item()
            if self.args.uses_stable and self.buffer is not None:
                logs["consistency_loss"] = (stats["consistency_loss"] / stats["micro_batches"]).item()
        if stats["ema_steps"]:
            logs["ema_skipped"] = (stats["ema_skipped"] / stats["ema_steps"]).item()
        self._reset_stats()
        return logs


def ema_coefficient(step: int, ema_alpha: float) -> float:
    """Weight kept on the stable adapter at optimizer step `step` (1-based): warm-up, then ema_alpha."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (the same reduction as transformers)."""
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def consistency_loss(plastic: list[torch.Tensor], stable: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over non-padding tokens, averaged over the selected layers."""
    weights = mask.unsqueeze(-1).float()
    hidden_size = plastic[0].shape[-1]
    total = sum((((p.float() - s.float()) ** 2) * weights).sum() for p, s in zip(plastic, stable))
    return total / (weights.sum().clamp_min(1.0) * hidden_size * len(plastic))


def split_rows(batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The unpadded rows of a right-padded batch. `lengths` (host ints from the collator) avoids a sync."""
    lengths = batch.get("lengths")
    if lengths is None:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
    ids, labels = batch["input_ids"], batch["labels"]
    return [ids[i, :n] for i, n in enumerate(lengths)], [labels[i, :n] for i, n in enumerate(lengths)]


def check_hidden_state_layers(model: PeftModel, layers: list[int]) -> list[int]:
    """Indices into the HF hidden_states tuple (num_hidden_layers + 1 long); out of range is an error."""
    config = model.get_base_model().config
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        raise ILoRAError(f"cannot check hidden_state_layers: {type(config).__name__} has no num_hidden_layers")
    size = count + 1
    bad = [i for i in layers if not -size <= i < size]
    if bad:
        raise ILoRAError(
            f"hidden_state_layers {bad} out of range: this model has {size} hidden states (indices {-size}..{size - 1})"
        )
    return sorted({i % size for i in layers})


__all__ = ["ILoRA", "PLASTIC", "STABLE", "causal_lm_loss", "consistency_loss", "ema_coefficient"]
