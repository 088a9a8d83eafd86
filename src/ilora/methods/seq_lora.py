"""Sequential LoRA: fine-tune one LoRA adapter on each task in turn, nothing against forgetting.

The lower bound every continual-learning method is measured against.
"""

from __future__ import annotations

from ilora.methods.base import Method


class SeqLoRA(Method):
    name = "seq_lora"

    def loss(self, batch, forward=None):
        ce = self.current_rows_loss(batch, forward)[0]
        return self.watch(ce)
