"""Experience replay (ER): each micro-batch is the current rows plus as many rows drawn from a
replay buffer over every example seen so far, across tasks; one cross-entropy over both.
"""

from __future__ import annotations

from ilora.methods.base import Method, causal_lm_loss, split_rows


class ER(Method):
    name = "er"
    replays = True

    def loss(self, batch, forward=None):
        ids, labels = split_rows(batch)
        replay_ids, replay_labels = self.draw_replay(batch["input_ids"].device)
        outputs, padded, _ = self.forward_rows(forward, ids + replay_ids, labels + replay_labels)
        # after the draw: a row is never replayed in its own step
        self.remember(ids, labels, surprise=self.surprise(outputs.logits, padded, len(ids)))
        ce = causal_lm_loss(outputs.logits, padded, across_ranks=True)
        self.record("ce_loss", ce)
        return self.watch(ce)
