"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Each task trains a new LoRA; the earlier tasks' LoRAs are frozen and summed in the forward, in
training and in evaluation (no task id). The new LoRA's A is pushed orthogonal to every earlier A:
loss = CE + lambda1 * sum_old sum_layers |A_old A_new^T| (L1) + lambda2 * ||new LoRA||^2.
Defaults lambda1 = 0.5, lambda2 = 0 as in the O-LoRA scripts. A task directory holds every earlier
task's LoRA as a PEFT adapter (`olora-1`, `olora-2`, ...) beside the new one (`plastic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

from ilora.config.checks import at_least, check_value
from ilora.core.adapters import PLASTIC, load_adapter
from ilora.methods.base import Method
from ilora.runtime.sharding import whole

PREFIX = "olora-"


@dataclass
class OLoRAArguments:
    """O-LoRA (method: olora)."""

    olora_lambda1: float = field(default=0.5, metadata={"help": "Weight of the orthogonality term (0.5 in O-LoRA)."})
    olora_lambda2: float = field(
        default=0.0, metadata={"help": "Weight of the new LoRA's squared L2 norm (0 in O-LoRA)."}
    )

    def __post_init__(self) -> None:
        check_value("olora_lambda1", self.olora_lambda1, at_least(0), "must be a finite number >= 0")
        check_value("olora_lambda2", self.olora_lambda2, at_least(0), "must be a finite number >= 0")


class OLoRA(Method):
    name = "olora"
    uses_whole_parameters = True
    Arguments = OLoRAArguments

    @classmethod
    def prepare_model(cls, model, previous, args, options):
        """Earlier LoRAs frozen; the previous task's trained LoRA joins them; a fresh LoRA to train."""
        if not previous:
            return
        earlier = sorted((n for n in previous if n.startswith(PREFIX)), key=task_number)
        for name in earlier:
            load_adapter(model, name, previous[name])
        load_adapter(model, f"{PREFIX}{len(earlier) + 1}", previous[PLASTIC])
        for layer in lora_layers(model):
            layer.reset_lora_parameters(PLASTIC, True)  # fresh, as PEFT initialises a new LoRA

    @classmethod
    def evaluated(cls, model, options):
        return {PLASTIC: frozen_names(model) + [PLASTIC]}

    @classmethod
    def saved_adapters(cls, options, previous: Sequence[str]) -> list[str]:
        """Every earlier task's LoRA (the previous task's trained one joins them) and the new one."""
        if not previous:
            return [PLASTIC]
        earlier = sorted((n for n in previous if n.startswith(PREFIX)), key=task_number)
        return [PLASTIC, *earlier, f"{PREFIX}{len(earlier) + 1}"]

    def loss(self, batch, forward=None):
        with self.adapters.active(self.evaluated(self.model, self.options)[PLASTIC]):  # every task's LoRA, summed
            ce = self.current_rows_loss(batch, forward)[0]
        loss = ce
        old = frozen_names(self.model)
        if old and self.options.olora_lambda1 > 0:
            orthogonality = orthogonality_loss(self.adapters.layers, old)
            self.record("orthogonality_loss", orthogonality)
            loss = loss + self.options.olora_lambda1 * orthogonality
        if self.options.olora_lambda2 > 0:
            loss = loss + self.options.olora_lambda2 * sum((whole(t) ** 2).sum() for t in self.adapters.plastic)
        return self.watch(loss)


def orthogonality_loss(layers, old: list[str]) -> torch.Tensor:
    """sum over layers and earlier tasks of |A_old A_new^T|, element-wise L1."""
    total = 0.0
    for layer in layers:  # whole: under FSDP2 the parameters are this rank's slices
        new = whole(layer.lora_A[PLASTIC].weight)
        for name in old:
            total = total + (whole(layer.lora_A[name].weight) @ new.T).abs().sum()
    return total


def frozen_names(model) -> list[str]:
    if model is None:
        return []
    return sorted((n for n in model.peft_config if n.startswith(PREFIX)), key=task_number)


def task_number(name: str) -> int:
    return int(name[len(PREFIX) :])


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer) and PLASTIC in m.lora_A]
