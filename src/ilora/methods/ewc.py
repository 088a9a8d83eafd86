"""Online EWC (Schwarz et al. 2018, "Progress & Compress"; Kirkpatrick et al. 2017) on the LoRA weights.

At the end of each task: the diagonal (empirical) Fisher of the plastic LoRA weights, the mean of
squared per-example gradients of the log-likelihood over `ewc_fisher_samples` of the task's rows,
is folded into a running Fisher, F* <- gamma * F* + F_task, and the weights are kept as theta*.
While training later tasks: loss = CE + lambda/2 * sum F* (theta - theta*)^2.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ilora.config.checks import at_least, check_value
from ilora.errors import ILoRAError
from ilora.methods.base import Method, causal_lm_loss, split_rows
from ilora.runtime import distributed
from ilora.runtime.sharding import whole


@dataclass
class EWCArguments:
    """Online EWC (method: ewc)."""

    ewc_lambda: float = field(
        default=0.5,
        metadata={"help": "Weight of the EWC penalty lambda/2 * sum F (theta - theta*)^2 (LLMCL's default)."},
    )
    ewc_gamma: float = field(
        default=1.0, metadata={"help": "Decay of the running Fisher before a task's is added (online EWC; 1 = none)."}
    )
    ewc_fisher_samples: int = field(
        default=64, metadata={"help": "Rows of each task whose per-example squared gradients estimate its Fisher."}
    )

    def __post_init__(self) -> None:
        check_value("ewc_lambda", self.ewc_lambda, at_least(0), "must be a finite number >= 0")
        check_value("ewc_gamma", self.ewc_gamma, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        check_value("ewc_fisher_samples", self.ewc_fisher_samples, at_least(1), "must be >= 1")


class EWC(Method):
    name = "ewc"
    uses_whole_parameters = True
    Arguments = EWCArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher: list[torch.Tensor] | None = None  # F*, one tensor per plastic tensor
        self.anchor: list[torch.Tensor] | None = None  # theta*

    def loss(self, batch, forward=None):
        ce = self.current_rows_loss(batch, forward)[0]
        loss = ce
        if self.fisher is not None:
            penalty = ewc_penalty([whole(t) for t in self.adapters.plastic], self.fisher, self.anchor)
            self.record("ewc_penalty", penalty)
            loss = ce + self.options.ewc_lambda / 2 * penalty
        return self.watch(loss)

    def end_of_task(self, batches) -> None:
        """Fisher of this task, folded into the running one; the weights become the new anchor."""
        task_fisher = self.estimate_fisher(batches)
        if self.fisher is None:
            self.fisher = task_fisher
        else:
            self.fisher = [self.options.ewc_gamma * f + g for f, g in zip(self.fisher, task_fisher)]
        self.anchor = [whole(t).detach().clone() for t in self.adapters.plastic]

    def estimate_fisher(self, batches) -> list[torch.Tensor]:
        """Mean squared per-example gradient of the row's log-likelihood over the first
        `ewc_fisher_samples` rows (the same rows on every rank; the mean over ranks keeps them equal)."""
        fisher = [torch.zeros(t.shape, dtype=t.dtype, device=self.device) for t in self.adapters.plastic]
        rows = (row for batch in batches for row in zip(*split_rows(batch)))
        seen = 0
        for row_ids, row_labels in itertools.islice(rows, self.options.ewc_fisher_samples):
            logits = self.model(input_ids=row_ids[None].to(self.device)).logits
            grads = self._gradients(causal_lm_loss(logits, row_labels[None].to(self.device)))
            for f, g in zip(fisher, grads):
                f += g.detach() ** 2
            seen += 1
        if seen == 0:
            raise ILoRAError("EWC: the task has no rows to estimate the Fisher information from")
        return [distributed.mean_(f / seen) for f in fisher]

    def _gradients(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """d loss / d plastic, whole. Sharded (FSDP2), the forward ran on gathered copies of the
        parameters, so the gradient reaches them only through FSDP's backward, reduce-scattered over
        the ranks: every rank scores the same row, so their mean is the row's gradient."""
        plastic = self.adapters.plastic
        if not self.adapters.sharded:
            return list(torch.autograd.grad(loss, plastic))
        for t in plastic:
            t.grad = None
        loss.backward()
        grads = [whole(t.grad) for t in plastic]
        for t in plastic:
            t.grad = None
        return grads

    def state(self):
        if self.fisher is None:
            return {}, {}
        tensors = {f"fisher.{i}": f for i, f in enumerate(self.fisher)}
        tensors.update({f"anchor.{i}": a for i, a in enumerate(self.anchor)})
        return tensors, {"tensors": len(self.fisher)}

    def load_state(self, tensors, record):
        if not record:
            return
        count = record.get("tensors")
        shapes = [t.shape for t in self.adapters.plastic]
        if count != len(shapes) or any(tensors[f"fisher.{i}"].shape != s for i, s in enumerate(shapes)):
            raise ILoRAError("EWC: the previous task's Fisher does not match this model's LoRA tensors")
        self.fisher = [tensors[f"fisher.{i}"].to(self.device) for i in range(count)]
        self.anchor = [tensors[f"anchor.{i}"].to(self.device) for i in range(count)]


def ewc_penalty(weights: list[torch.Tensor], fisher: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """sum F (theta - theta*)^2 over every tensor."""
    return sum(((w - a) ** 2 * f).sum() for w, f, a in zip(weights, fisher, anchor))
