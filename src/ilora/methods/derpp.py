"""DER++ (Buzzega et al. 2020, "Dark Experience for General Continual Learning").

A reservoir buffer keeps each row with the model's logits at the time it was inserted. Per step:
loss = CE(current) + alpha * MSE(logits on replayed rows, stored logits) + beta * CE(other replayed rows),
all in one forward pass over current + both replay draws.

A 49k-word vocabulary makes whole logit rows expensive (49,152 x 4 bytes per token), so only what
the loss needs is stored: the response tokens' `derpp_top_k` largest logits and their vocabulary
indices (float16 values, int32 indices: 6 bytes per kept logit). The MSE is taken on those entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ilora.config.checks import at_least, check_value
from ilora.data.encode import IGNORE_INDEX
from ilora.methods.base import Method, causal_lm_loss, shift_labels, split_rows
from ilora.runtime import distributed

VALUES, INDICES = "logit_values", "logit_indices"


@dataclass
class DERppArguments:
    """DER++ (method: derpp)."""

    # No values exist for LoRA on a language model; these are from the DER++ grids (mammoth's best
    # arguments use alpha 0.1-0.2 and beta 0.5 on Seq-CIFAR-10).
    derpp_alpha: float = field(default=0.1, metadata={"help": "Weight of the logit MSE on replayed rows."})
    derpp_beta: float = field(default=0.5, metadata={"help": "Weight of the CE on replayed rows."})
    derpp_top_k: int = field(
        default=64, metadata={"help": "Largest logits kept per response token in the buffer (the MSE runs on them)."}
    )

    def __post_init__(self) -> None:
        check_value("derpp_alpha", self.derpp_alpha, at_least(0), "must be a finite number >= 0")
        check_value("derpp_beta", self.derpp_beta, at_least(0), "must be a finite number >= 0")
        check_value("derpp_top_k", self.derpp_top_k, at_least(1), "must be >= 1")


class DERpp(Method):
    name = "derpp"
    Arguments = DERppArguments
    replays = True

    def loss(self, batch, forward=None):
        ids, labels = split_rows(batch)
        device = batch["input_ids"].device
        logit_rows = self.draw_rows(device)  # rows for the logit MSE, with their stored logits
        ce_rows = self.draw_rows(device)  # an independent draw for the replay CE
        n, m = len(ids), len(logit_rows[0])
        outputs, padded, _ = self.forward_rows(
            forward, ids + logit_rows[0] + ce_rows[0], labels + logit_rows[1] + ce_rows[1]
        )
        logits = outputs.logits
        ce = causal_lm_loss(logits[:n], padded[:n], across_ranks=True)
        self.record("ce_loss", ce)
        loss = ce
        if m:
            stored = logit_rows[2]
            mse = logit_mse(logits[n : n + m], padded[n : n + m], stored)
            self.record("logit_mse", mse)
            loss = loss + self.options.derpp_alpha * mse
        if ce_rows[0]:
            replay_ce = causal_lm_loss(logits[n + m :], padded[n + m :], across_ranks=True)
            self.record("replay_ce_loss", replay_ce)
            loss = loss + self.options.derpp_beta * replay_ce
        kept = [top_logits(logits[i], padded[i], self.options.derpp_top_k) for i in range(n)]
        self.remember(ids, labels, kept, self.surprise(logits, padded, n))
        return self.watch(loss)

    @torch.no_grad()
    def seed_replay(self, batches) -> None:
        """Each row with the current model's logits on it, as DER++ keeps a row it trained on."""
        for batch in batches:
            ids, labels = split_rows(batch)
            outputs, padded, _ = self.forward_rows(None, ids, labels)
            k = self.options.derpp_top_k
            kept = [top_logits(outputs.logits[i], padded[i], k) for i in range(len(ids))]
            self.remember(ids, labels, kept, self.surprise(outputs.logits, padded, len(ids)), shard=False)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions of a row whose logits predict a labelled (response) token."""
    return shift_labels(labels[None])[0] != IGNORE_INDEX


@torch.no_grad()
def top_logits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What the buffer keeps of one row's logits: the k largest per response token, and where."""
    kept = logits[response_positions(labels)].float()
    values, indices = kept.topk(min(k, kept.shape[-1]), dim=-1)
    return {VALUES: values.half(), INDICES: indices.int()}


def logit_mse(logits: torch.Tensor, labels: torch.Tensor, stored: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean squared error between the current logits and the stored ones, on the stored entries."""
    current, target = [], []
    for row_logits, row_labels, row in zip(logits, labels, stored):
        now = row_logits[response_positions(row_labels)].float()
        current.append(now.gather(-1, row[INDICES].long()).flatten())
        target.append(row[VALUES].float().flatten())
    current, target = torch.cat(current), torch.cat(target)
    # the mean over every rank's stored entries, as this rank's share (in one process: the mean)
    return distributed.share_of_mean(
        F.mse_loss(current, target, reduction="sum"), torch.tensor(current.numel(), device=current.device)
    )


def bytes_per_row(response_tokens: int, top_k: int) -> int:
    """Buffer memory the stored logits add per row: float16 value + int32 index per kept logit."""
    return response_tokens * top_k * (2 + 4)
