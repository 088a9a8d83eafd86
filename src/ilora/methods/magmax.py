"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning").

Train one LoRA sequentially, task after task (as `seq_lora`); the model after task k differs from the
base by the task vector tau_k = scaling * B_k A_k of each adapted module. The evaluated model `merged`
is the base plus `magmax_scaling` times the per-parameter maximum-magnitude merge of tau_1 .. tau_k:
each weight takes the change of largest absolute value among the tasks (on a tie the later task's, as
the official `merge_max_abs`). `plastic`, the sequentially trained LoRA alone, is evaluated beside it.

A task directory holds the earlier tasks' LoRAs (`magmax-1`, ...) beside the trained one, so the merge
is exact at any task; it is dense, not a sum of LoRAs, so `ilora export` writes it merged only
(`--merge`), and the plastic LoRA is what an unmerged export or a LoRA server can take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ilora.config.checks import above, check_value
from ilora.core.adapters import PLASTIC
from ilora.methods.task_loras import TaskLoRAs, lora_layers

MERGED = "merged"


@dataclass
class MagMaxArguments:
    """MagMax (method: magmax)."""

    magmax_scaling: float = field(
        default=0.5,
        metadata={"help": "Scaling of the merged task vector added to the base (0.5 in MagMax's merge script)."},
    )

    def __post_init__(self) -> None:
        check_value("magmax_scaling", self.magmax_scaling, above(0), "must be a finite number > 0")


class MagMax(TaskLoRAs):
    name = "magmax"
    prefix = "magmax-"
    fresh_lora_per_task = False
    merges_into_base = True
    Arguments = MagMaxArguments

    @classmethod
    def evaluated(cls, model, options):
        """The sequentially trained LoRA, and the merge of every task's (the adapters the merge reads)."""
        return {PLASTIC: [PLASTIC], MERGED: cls.frozen(model) + [PLASTIC]}

    @classmethod
    def merged_weights(cls, model, report, options):
        if report != MERGED:
            return None
        return {
            name: options.magmax_scaling * max_magnitude([layer.get_delta_weight(n).detach() for n in tasks])
            for name, layer, tasks in _task_vectors(model, cls.evaluated(model, options)[MERGED])
        }

    def loss(self, batch, forward=None):
        return self.watch(self.current_rows_loss(batch, forward)[0])


def _task_vectors(model, names: list[str]):
    """(module name, LoRA layer, the adapters of `names` it holds) for every adapted module."""
    layers = {id(layer) for layer in lora_layers(model)}
    for name, module in model.named_modules():
        if id(module) in layers:
            yield name, module, [n for n in names if n in module.lora_A]


@torch.no_grad()
def max_magnitude(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise, the entry of largest absolute value across `task_vectors`; a tie goes to the later."""
    merged = task_vectors[0]
    for vector in task_vectors[1:]:
        merged = torch.where(vector.abs() >= merged.abs(), vector, merged)
    return merged
