"""Sequential LoRA: fine-tune one LoRA adapter on each task in turn, nothing against forgetting.

The lower bound every continual-learning method is measured against.
"""

from __future__ import annotations

from .base import Method, causal_lm_loss, split_rows


class SeqLoRA(Method):
    name = "seq_lora"

    def loss(self, batch, forward=None):
        ids, labels = split_rows(batch)
        outputs, labels, _ = self.forward_rows(forward, ids, labels)
        ce = causal_lm_loss(outputs.logits, labels)
        self.record("ce_loss", ce)
        return self.watch(ce)
