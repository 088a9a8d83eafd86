"""I-LoRA, one training step at a time (Ren et al., arXiv 2402.18865).

Per micro-batch:
  1. draw replay rows from the reservoir buffer, then add the current rows to it;
  2. stable pass, no grad: hidden states of the replay rows (and, with selective update, the stable
     adapter's loss on the whole batch);
  3. plastic pass, with grad, over current + replay rows: cross-entropy and the same hidden states;
  4. loss = CE + consistency_weight * MSE(plastic hidden, target) over non-padding replay tokens,
     target = the stable hidden states (`ilora_consistency_target: stable`) or their element-wise maximum
     with the plastic ones (`max`, as the official code does).
After each optimizer step:
  5. stable <- a * stable + (1 - a) * plastic,  a = min(1 - 1/(t+1), ema_alpha),  t = optimizer steps
     since the first task began (carried across tasks).

Two forward passes, one of them without grad and with the LM head on one position only. Nothing here
reads a value back to the host: statistics stay on the device until `pop_logs()` is called at the log
interval.

The options keep the names of EasyCL's I-LoRA module (`ema_alpha`, `consistency_weight`, ...), so its
configs run unchanged; the two ilora adds for the official code's variants carry the method's prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ilora.config.checks import at_least, check_choice, check_value, in_unit_interval
from ilora.core.adapters import PLASTIC, STABLE, add_stable_copy, load_adapter
from ilora.data.encode import pad_rows
from ilora.errors import ILoRAError
from ilora.methods.base import Method, causal_lm_loss, split_rows
from ilora.runtime import distributed

# EasyCL's I-LoRA parameters (its README's twelve): ilora's names too. Five are shared by every method
# (config.arguments.ContinualArguments), the other seven are I-LoRA's own, below.
EASYCL_NAMES = (
    "use_ilora",
    "ema_alpha",
    "consistency_weight",
    "ilora_buffer_size",
    "selective_update",
    "min_update_threshold",
    "hidden_state_layers",
    "save_ema_adapter",
    "ema_adapter_path",
    "previous_task_model",
    "current_task_id",
    "prev_task_id",
)
CONSISTENCY_TARGETS = ("stable", "max")
REPLAY_LOSSES = ("joint", "mean_of_parts")


@dataclass
class ILoRAArguments:
    """I-LoRA (method: ilora): the stable adapter's EMA and the consistency loss."""

    ema_alpha: float = field(
        default=0.999,
        metadata={
            "help": "Weight kept on the stable adapter after each optimizer step: "
            "stable = a*stable + (1-a)*plastic with a = min(1 - 1/(t+1), ema_alpha). 0.999 = slow."
        },
    )
    consistency_weight: float = field(
        default=1.0, metadata={"help": "Weight of the MSE between plastic and stable hidden states on replay rows."}
    )
    ilora_consistency_target: str = field(
        default="stable",
        metadata={
            "help": "The consistency target: 'stable' hidden states (the paper), or 'max', their "
            "element-wise maximum with the plastic ones (the official code)."
        },
    )
    ilora_replay_loss: str = field(
        default="joint",
        metadata={
            "help": "The CE: 'joint' = one mean over current + replay tokens; 'mean_of_parts' = "
            "(CE current + CE replay) / 2 (the official code)."
        },
    )
    selective_update: bool = field(
        default=False,
        metadata={
            "help": "Apply the EMA step only if the plastic adapter's mean token loss on the step's batch is lower "
            "than the stable adapter's by at least min_update_threshold (costs a stable pass on the whole batch)."
        },
    )
    min_update_threshold: float = field(
        default=0.1, metadata={"help": "Margin (absolute, in nats) for selective_update."}
    )
    hidden_state_layers: list[str] = field(
        default_factory=lambda: [-1],
        metadata={
            "help": "Indices into the HF hidden_states tuple (length layers+1; -1 = final normed output), "
            "or 'all' (every one, embeddings included: the official code)."
        },
    )
    save_ema_adapter: bool = field(default=True, metadata={"help": "Save the stable adapter next to the plastic one."})
    ema_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the stable adapter is saved (default <output_dir>/stable) and, for a chained task, "
            "loaded from if given."
        },
    )

    def __post_init__(self) -> None:
        rule = "must be in [0, 1) (it is the weight kept on the stable adapter)"
        check_value("ema_alpha", self.ema_alpha, in_unit_interval, rule)
        check_value("consistency_weight", self.consistency_weight, at_least(0), "must be a finite number >= 0")
        check_value("min_update_threshold", self.min_update_threshold, at_least(0), "must be a finite number >= 0")
        check_choice("ilora_consistency_target", self.ilora_consistency_target, CONSISTENCY_TARGETS)
        check_choice("ilora_replay_loss", self.ilora_replay_loss, REPLAY_LOSSES)
        self.hidden_state_layers = _layer_list(self.hidden_state_layers)
        if len(set(self.hidden_state_layers)) != len(self.hidden_state_layers):
            raise ILoRAError(f"hidden_state_layers={self.hidden_state_layers} repeats a layer")


def _layer_list(layers) -> list:
    """hidden_state_layers as integers, or ['all']. The parser hands over strings, YAML integers."""
    layers = [layers] if isinstance(layers, (int, str)) else list(layers or [])
    if not layers:
        raise ILoRAError("hidden_state_layers must name at least one layer (e.g. [-1]) or be 'all'")
    if layers == ["all"]:
        return layers
    result = []
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise ILoRAError(f"hidden_state_layers={layers} must be a list of integers, or 'all'")
        result.append(int(value))
    return result


class ILoRA(Method):
    name = "ilora"
    Arguments = ILoRAArguments
    replays = True

    @classmethod
    def prepare_model(cls, model: PeftModel, previous: dict, args, options: ILoRAArguments) -> None:
        check_hidden_state_layers(model, options.hidden_state_layers)  # before the Trainer creates output_dir
        if STABLE in model.peft_config:  # a PeftModel handed over with both adapters
            return
        if not previous:
            add_stable_copy(model)
        elif STABLE in previous:
            load_adapter(model, STABLE, previous[STABLE])
        else:
            raise ILoRAError("the previous task saved no stable adapter (save_ema_adapter was off)")

    @classmethod
    def evaluated(cls, model, options):
        return {PLASTIC: [PLASTIC], STABLE: [STABLE]}

    @classmethod
    def saved_adapters(cls, options: ILoRAArguments, previous: Sequence[str]) -> list[str]:
        return [PLASTIC, STABLE] if options.save_ema_adapter else [PLASTIC]

    @classmethod
    def adapter_locations(cls, output_dir: Path, options: ILoRAArguments, chained: bool) -> dict[str, Path]:
        """ema_adapter_path names where the stable adapter is saved, except for a chained task, where it
        names the previous stable adapter: that one is never overwritten."""
        return {STABLE: Path(options.ema_adapter_path)} if options.ema_adapter_path and not chained else {}

    @classmethod
    def previous_adapter_locations(cls, options: ILoRAArguments) -> dict[str, Path]:
        return {STABLE: Path(options.ema_adapter_path)} if options.ema_adapter_path else {}

    def __init__(self, model: PeftModel, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if not self.adapters.has_stable:
            raise ILoRAError("I-LoRA needs a stable adapter on the model (see ilora.core.adapters.attach_adapters)")
        self.layers = check_hidden_state_layers(model, self.options.hidden_state_layers)
        # the LM head's output is not needed on the stable side: keep one position where the model allows
        accepts = "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters
        self._one_logit = {"logits_to_keep": 1} if accepts else {}
        # selective update: plastic and stable losses summed over the micro-batches of one optimizer step
        self._selective_plastic = torch.zeros((), device=self.device)
        self._selective_stable = torch.zeros((), device=self.device)
        self._selective_micro = 0
        self._ema_skipped = torch.zeros((), device=self.device)
        self._ema_decisions = 0

    # ---------------------------------------------------------------- the step
    def loss(self, batch: dict, forward: torch.nn.Module | None = None) -> torch.Tensor:
        current_ids, current_labels = split_rows(batch)
        replay_ids, replay_labels = self.draw_replay(device=batch["input_ids"].device)

        input_ids, labels, attention_mask = pad_rows(
            current_ids + replay_ids, current_labels + replay_labels, self.pad_token_id
        )
        self._last_batch = (input_ids, attention_mask, labels)
        num_current = len(current_ids)
        replay_len = max((len(row) for row in replay_ids), default=0)
        wants_consistency = bool(replay_ids) and self.options.consistency_weight > 0
        selective = self.options.selective_update

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
        # after the draw: a row is never replayed in its own step
        self.remember(current_ids, current_labels, surprise=self.surprise(outputs.logits, labels, num_current))
        ce = self._cross_entropy(outputs.logits, labels, num_current, bool(replay_ids))
        loss = ce
        if wants_consistency:
            plastic_hidden = [outputs.hidden_states[i][num_current:, :replay_len] for i in self.layers]
            if self.options.ilora_consistency_target == "max":
                stable_hidden = [torch.where(p > s, p, s) for p, s in zip(plastic_hidden, stable_hidden)]
            mask = attention_mask[num_current:, :replay_len]
            consistency = consistency_loss(plastic_hidden, stable_hidden, mask)
            loss = ce + self.options.consistency_weight * consistency
            self.record("consistency_loss", consistency)
        elif self.buffer is not None:  # no replay rows yet: a zero keeps the logged curve's shape
            self.record("consistency_loss", torch.zeros((), device=ce.device))
        self.record("ce_loss", ce)
        if selective:
            self._selective_plastic += ce.detach()
            self._selective_micro += 1
        return self.watch(loss)

    def _cross_entropy(self, logits, labels, num_current: int, has_replay: bool) -> torch.Tensor:
        """`joint`: one mean over every labelled token; `mean_of_parts`: the mean of the current rows'
        loss and the replay rows' loss, as the official code computes it."""
        if self.options.ilora_replay_loss == "joint" or not has_replay:
            return causal_lm_loss(logits, labels, across_ranks=True)
        current = causal_lm_loss(logits[:num_current], labels[:num_current], across_ranks=True)
        replay = causal_lm_loss(logits[num_current:], labels[num_current:], across_ranks=True)
        return (current + replay) / 2

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The EMA step. Call once per optimizer step, after `optimizer.step()`."""
        self.step += 1
        weight = 1.0 - ema_coefficient(self.step, self.options.ema_alpha)
        if self.options.selective_update and self._selective_micro:
            # every rank takes the same decision, or the stable adapters would drift apart
            losses = distributed.mean_(torch.stack([self._selective_plastic, self._selective_stable]))
            plastic, stable = losses / self._selective_micro
            apply = (stable - plastic >= self.options.min_update_threshold).to(self.adapters.plastic[0].dtype)
            self._ema_skipped += 1.0 - apply
            self._ema_decisions += 1
            self.adapters.ema_(apply * weight)
            self._selective_plastic.zero_()
            self._selective_stable.zero_()
            self._selective_micro = 0
        else:
            self.adapters.ema_(weight)

    def pop_logs(self) -> dict[str, float]:
        logs = super().pop_logs()
        if self._ema_decisions:
            logs["ema_skipped"] = (self._ema_skipped / self._ema_decisions).item()
            self._ema_skipped.zero_()
            self._ema_decisions = 0
        return logs

    # ----------------------------------------------------------- the passes
    @torch.no_grad()
    def _stable_pass_replay(self, input_ids, attention_mask, num_current, replay_len) -> list[torch.Tensor]:
        """Stable hidden states of the replay rows only. Through the model's own forward, so a sharded
        model gathers its parameters as for any forward (FSDP2's root hooks), but with one logit position:
        the LM head's output is not needed here."""
        with self.adapters.active(STABLE):
            out = self.model(
                input_ids=input_ids[num_current:, :replay_len],
                attention_mask=attention_mask[num_current:, :replay_len],
                output_hidden_states=self.layers,
                **self._one_logit,
            )
        return [out.hidden_states[i] for i in self.layers]

    @torch.no_grad()
    def _stable_pass_full(self, input_ids, labels, attention_mask, num_current, replay_len):
        """Selective update: the stable loss on the whole batch, and the replay rows' hidden states."""
        with self.adapters.active(STABLE):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layers)
        self._selective_stable += causal_lm_loss(out.logits, labels, across_ranks=True)
        return [out.hidden_states[i][num_current:, :replay_len] for i in self.layers]


def ema_coefficient(step: int, ema_alpha: float) -> float:
    """Weight kept on the stable adapter at optimizer step `step` (1-based): warm-up, then ema_alpha."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


def consistency_loss(plastic: list[torch.Tensor], stable: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over non-padding tokens, averaged over the selected layers (over
    every rank's replay rows, as this rank's share, when several train)."""
    weights = mask.unsqueeze(-1).float()
    hidden_size = plastic[0].shape[-1]
    total = sum((((p.float() - s.float()) ** 2) * weights).sum() for p, s in zip(plastic, stable))
    return distributed.share_of_mean(total, weights.sum() * hidden_size * len(plastic))


def check_hidden_state_layers(model: PeftModel, layers: list[int] | list[str]) -> list[int]:
    """Indices into the HF hidden_states tuple (num_hidden_layers + 1 long; `all` = every one of them);
    out of range is an error."""
    config = model.get_base_model().config
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        raise ILoRAError(f"cannot check hidden_state_layers: {type(config).__name__} has no num_hidden_layers")
    size = count + 1
    if list(layers) == ["all"]:
        return list(range(size))
    bad = [i for i in layers if not -size <= i < size]
    if bad:
        raise ILoRAError(
            f"hidden_state_layers {bad} out of range: this model has {size} hidden states (indices {-size}..{size - 1})"
        )
    chosen = sorted({i % size for i in layers})
    if chosen == [0] and not isinstance(model.get_base_model().get_input_embeddings(), BaseTunerLayer):
        raise ILoRAError(
            f"hidden_state_layers {list(layers)} is only the embeddings' output, which no adapter "
            "changes here: the consistency loss would always be 0 (use -1, the last layer)"
        )
    return chosen
