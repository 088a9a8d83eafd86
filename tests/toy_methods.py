"""Two small methods, registered by tests only, that use the hooks the next methods need: a start-of-task
hook that sees the task's rows and designs the down-projection (InfLoRA's shape), a trainable-tensors
hook that trains the up-projection only, and an evaluated model that is not a sum of adapters
(MagMax's shape)."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ilora.core.adapters import PLASTIC
from ilora.methods.base import Method


class DesignedDown(Method):
    """Before each task, every plastic lora_A is set from the task's rows (a seed drawn from their token
    ids); only the lora_B tensors train."""

    name = "toy_designed"
    calls: list[dict] = []  # every start_of_task call, in order (class-level: a test reads it after training)

    def trainable(self, pair):
        return [t for t, slot in zip(pair.plastic, pair.slots) if slot == "lora_B"]

    def start_of_task(self, batches) -> None:
        rows = [ids[:n].tolist() for batch in batches for ids, n in zip(batch["input_ids"], batch["lengths"])]
        generator = torch.Generator().manual_seed(sum(map(sum, rows)) % 2**31)
        with torch.no_grad():
            for tensor, slot in zip(self.adapters.plastic, self.adapters.slots):
                if slot == "lora_A":
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        type(self).calls.append({"rows": rows, "step": self.step})

    def loss(self, batch, forward=None):
        return self.watch(self.current_rows_loss(batch, forward)[0])


class Doubled(Method):
    """Trains as sequential LoRA, but its evaluated model is the base plus twice the plastic adapter's
    weight change, handed over as dense weights (not a sum of adapters)."""

    name = "toy_doubled"

    @classmethod
    def merged_weights(cls, model, report, options):
        changes = {}
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and PLASTIC in layer.lora_A:
                changes[name] = 2 * layer.get_delta_weight(PLASTIC).detach()
        return changes

    def loss(self, batch, forward=None):
        return self.watch(self.current_rows_loss(batch, forward)[0])
