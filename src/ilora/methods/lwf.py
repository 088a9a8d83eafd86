"""Learning without Forgetting (Li & Hoiem 2017) for a causal LM with LoRA.

The previous task's adapter, frozen, is the teacher: on the current rows, its softened output
distribution over the response tokens is distilled into the trained adapter.
loss = CE + lwf_weight * KL(softmax(teacher / T) || softmax(student / T)), mean over response tokens.
(No T^2 factor: Li & Hoiem weight the distillation term by lambda_o alone.) The first task has no
teacher and trains with CE alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ilora.config.checks import above, at_least, check_value
from ilora.core.adapters import load_adapter
from ilora.data.encode import IGNORE_INDEX
from ilora.methods.base import Method, shift_labels
from ilora.runtime import distributed

TEACHER = "teacher"


@dataclass
class LwFArguments:
    """Learning without Forgetting (method: lwf)."""

    lwf_weight: float = field(
        default=1.0, metadata={"help": "Weight of the distillation term (lambda_o = 1 in the paper)."}
    )
    lwf_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T (2 in the paper)."})

    def __post_init__(self) -> None:
        check_value("lwf_weight", self.lwf_weight, at_least(0), "must be a finite number >= 0")
        check_value("lwf_temperature", self.lwf_temperature, above(0), "must be > 0")


class LwF(Method):
    name = "lwf"
    Arguments = LwFArguments

    @classmethod
    def prepare_model(cls, model, previous, args, options):
        if "plastic" in previous:
            load_adapter(model, TEACHER, previous["plastic"])

    def loss(self, batch, forward=None):
        ce, outputs, labels, attention_mask = self.current_rows_loss(batch, forward)
        loss = ce
        if TEACHER in self.model.peft_config:
            with torch.no_grad(), self.adapters.active(TEACHER):
                teacher = self.model(input_ids=self._last_batch[0], attention_mask=attention_mask).logits
            distill = distillation_loss(outputs.logits, teacher, labels, self.options.lwf_temperature)
            self.record("distillation_loss", distill)
            loss = ce + self.options.lwf_weight * distill
        return self.watch(loss)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """KL(teacher_T || student_T) per response token (positions whose next token is labelled), averaged
    (over every rank's micro-batch, as this rank's share, when several train)."""
    mask = shift_labels(labels) != IGNORE_INDEX
    log_student = F.log_softmax(student[mask].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    return distributed.share_of_mean(kl, mask.sum())
