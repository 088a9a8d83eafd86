"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Each task trains a new LoRA; the earlier tasks' LoRAs are frozen and summed in the forward, in
training and in evaluation (no task id). The new LoRA's A is pushed orthogonal to every earlier A:
loss = CE + lambda1 * sum_old sum_layers |A_old A_new^T| (L1) + lambda2 * ||new LoRA||^2.
Defaults lambda1 = 0.5, lambda2 = 0 as in the O-LoRA scripts. A task directory holds every earlier
task's LoRA as a PEFT adapter (`olora-1`, `olora-2`, ...) beside the new one (`plastic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ilora.config.checks import at_least, check_value
from ilora.core.adapters import PLASTIC
from ilora.methods.task_loras import TaskLoRAs
from ilora.runtime.sharding import whole


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


class OLoRA(TaskLoRAs):
    name = "olora"
    prefix = "olora-"
    uses_whole_parameters = True
    Arguments = OLoRAArguments

    def loss(self, batch, forward=None):
        loss = self.summed_rows_loss(batch, forward)
        old = self.frozen(self.model)
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
