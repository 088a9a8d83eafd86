"""N-LoRA (Yang et al., COLING 2025, "Is Parameter Collision Hindering Continual Learning in LLMs?").

O-LoRA's structure (a new LoRA per task, the earlier tasks' LoRAs frozen and summed in the forward, in
training and evaluation) with a sparsity term on the new task's update in place of the orthogonality
term: sparse updates of different tasks rarely collide in the same parameters.
loss = CE + lambda1 * sum over adapted modules of ||B A||_1 (element-wise, the dense update
without LoRA's scaling, as in the paper and the official code). A task directory holds every earlier
task's LoRA as a PEFT adapter (`nlora-1`, `nlora-2`, ...) beside the new one (`plastic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ilora.config.checks import at_least, check_value
from ilora.core.adapters import PLASTIC
from ilora.methods.task_loras import TaskLoRAs
from ilora.runtime.sharding import whole


@dataclass
class NLoRAArguments:
    """N-LoRA (method: nlora)."""

    nlora_lambda1: float = field(
        default=0.4,
        metadata={"help": "Weight of the L1 norm of the new LoRA's update B A (0.4 in N-LoRA's T5 scripts)."},
    )

    def __post_init__(self) -> None:
        check_value("nlora_lambda1", self.nlora_lambda1, at_least(0), "must be a finite number >= 0")


class NLoRA(TaskLoRAs):
    name = "nlora"
    prefix = "nlora-"
    uses_whole_parameters = True
    Arguments = NLoRAArguments

    def loss(self, batch, forward=None):
        loss = self.summed_rows_loss(batch, forward)
        if self.options.nlora_lambda1 > 0:
            sparsity = sparsity_loss(self.adapters.layers)
            self.record("sparsity_loss", sparsity)
            loss = loss + self.options.nlora_lambda1 * sparsity
        return self.watch(loss)


def sparsity_loss(layers) -> torch.Tensor:
    """sum over layers of |B_new A_new|, element-wise L1 of each module's dense update."""
    total = 0.0
    for layer in layers:  # whole: under FSDP2 the parameters are this rank's slices
        update = whole(layer.lora_B[PLASTIC].weight) @ whole(layer.lora_A[PLASTIC].weight)
        total = total + update.abs().sum()
    return total
