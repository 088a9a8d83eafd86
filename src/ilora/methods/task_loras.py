"""What O-LoRA, N-LoRA and MagMax share: every earlier task's LoRA kept, frozen, beside the trained one.

After task k a task directory holds the LoRAs of tasks 1 .. k-1 as PEFT adapters `<prefix>1` ...
`<prefix>(k-1)` and task k's own as `plastic`. The next task loads them all, adds task k's LoRA as
`<prefix>k`, and then trains either a fresh LoRA (O-LoRA, N-LoRA: one LoRA per task) or task k's LoRA
further (MagMax: sequential fine-tuning, the frozen copies are the task vectors it merges).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

from peft.tuners.lora import LoraLayer

from ilora.core.adapters import PLASTIC, load_adapter
from ilora.methods.base import Method


class TaskLoRAs(Method):
    prefix: ClassVar[str] = ""  # the frozen copies are named <prefix>1, <prefix>2, ...
    fresh_lora_per_task: ClassVar[bool] = True  # False: the plastic LoRA goes on from the previous task's

    @classmethod
    def prepare_model(cls, model, previous, args, options):
        """The earlier tasks' LoRAs frozen, the previous task's trained LoRA among them; then a fresh LoRA
        to train (initialised as PEFT initialises a new one), or the previous task's trained further."""
        if not previous:
            return
        earlier = cls.earlier(previous)
        for name in earlier:
            load_adapter(model, name, previous[name])
        load_adapter(model, f"{cls.prefix}{len(earlier) + 1}", previous[PLASTIC])
        if cls.fresh_lora_per_task:
            for layer in lora_layers(model):
                layer.reset_lora_parameters(PLASTIC, True)

    @classmethod
    def evaluated(cls, model, options):
        """Every task's LoRA, summed (no task id at test time)."""
        return {PLASTIC: cls.frozen(model) + [PLASTIC]}

    @classmethod
    def saved_adapters(cls, options, previous: Sequence[str]) -> list[str]:
        """Every earlier task's LoRA (the previous task's trained one joins them) and the trained one."""
        if not previous:
            return [PLASTIC]
        earlier = cls.earlier(previous)
        return [PLASTIC, *earlier, f"{cls.prefix}{len(earlier) + 1}"]

    @classmethod
    def frozen(cls, model) -> list[str]:
        """The earlier tasks' LoRAs on `model` (none before a model exists), in task order."""
        return [] if model is None else cls.earlier(model.peft_config)

    def summed_rows_loss(self, batch: dict, forward=None):
        """Cross-entropy of the micro-batch through every task's LoRA summed (the evaluated model)."""
        with self.adapters.active(self.frozen(self.model) + [PLASTIC]):
            return self.current_rows_loss(batch, forward)[0]

    @classmethod
    def earlier(cls, names: Iterable[str]) -> list[str]:
        numbered = [n for n in names if n.startswith(cls.prefix) and n[len(cls.prefix) :].isdigit()]
        return sorted(numbered, key=lambda n: int(n[len(cls.prefix) :]))


def lora_layers(model) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and PLASTIC in m.lora_A]
