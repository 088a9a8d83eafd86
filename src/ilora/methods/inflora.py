"""InfLoRA (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning").

Each task adds a LoRA branch B_t A_t (the earlier tasks' branches frozen and summed in the forward, as
O-LoRA's). Before the task, A_t is designed, not learned: the inputs each adapted module sees on the new
task's rows give a covariance C = sum x x^T; the part of C in the subspace the earlier tasks occupy is
projected out, and A_t's rows are the top `r` left singular vectors of what is left, times 1/sqrt(3) (the
official code's scale). Only B_t trains (from zero), so the new branch changes outputs only along input
directions the earlier tasks do not use. After the task, that subspace grows by the new task's inputs
(DualGPM: the leading directions whose share of the inputs' energy, the covariance's singular values,
reaches `inflora_threshold`, as the paper states it); it is the method's state, saved and resumed like
EWC's Fisher. (The official code takes shares of the covariance's squared singular values, the 4th
power of the inputs'; on an LLM's activations, whose few outlier dimensions dominate, that keeps one or
two directions per module at 0.95, against about 70-160 of SmolLM2's 576 by the paper's measure.)

A subspace of more than half the input dimension is kept as its complement ("retain": the directions
still free) rather than itself ("remove"), as the official code keeps it, so the state is at most
d x d/2 per module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear

from ilora.config.checks import check_value
from ilora.core.adapters import PLASTIC
from ilora.errors import ILoRAError
from ilora.methods.task_loras import TaskLoRAs
from ilora.runtime.sharding import assign, shape

REMOVE, RETAIN = "remove", "retain"  # the basis spans the earlier tasks' subspace, or its complement
DOWN_SCALE = 1 / math.sqrt(3)  # A = U_r^T / sqrt(3), as the official code initialises it


@dataclass
class InfLoRAArguments:
    """InfLoRA (method: inflora)."""

    inflora_threshold: float = field(
        default=0.95,
        metadata={
            "help": "Share of each module's input energy (its covariance's singular values) the earlier tasks' "
            "subspace must hold after a task (DualGPM's threshold; 0.95 in InfLoRA's CIFAR-100 config)."
        },
    )

    def __post_init__(self) -> None:
        check_value("inflora_threshold", self.inflora_threshold, lambda v: 0 < v < 1, "must be in (0, 1)")


class InfLoRA(TaskLoRAs):
    name = "inflora"
    prefix = "inflora-"
    uses_whole_parameters = True  # designs whole A matrices: refused under ZeRO-3
    Arguments = InfLoRAArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # per adapted module: an orthonormal basis (d_in x k) and what it spans; None before the first task ends
        self.bases: list[torch.Tensor] | None = None
        self.kinds: list[str] | None = None

    def trainable(self, pair):
        """B only: A is designed before the task and stays as designed."""
        return [t for t, slot in zip(pair.plastic, pair.slots) if slot == "lora_B"]

    def loss(self, batch, forward=None):
        return self.watch(self.summed_rows_loss(batch, forward))

    def start_of_task(self, batches) -> None:
        """Design every module's A from the task's inputs, away from the earlier tasks' subspace."""
        covariances = self.input_covariances(batches)
        with torch.no_grad():
            for i, (layer, covariance) in enumerate(zip(self.adapters.layers, covariances)):
                if self.bases is not None:
                    covariance = unprotected_part(covariance, self.bases[i], self.kinds[i])
                down = layer.lora_A[PLASTIC].weight
                left = torch.linalg.svd(covariance, full_matrices=False).U[:, : shape(down)[0]]
                assign(down, left.T * DOWN_SCALE)

    def end_of_task(self, batches) -> None:
        """Grow the earlier tasks' subspace by this task's inputs (through the model as trained)."""
        covariances = self.input_covariances(batches)
        threshold = self.options.inflora_threshold
        if self.bases is None:
            grown = [first_basis(c, threshold) for c in covariances]
        else:
            grown = [grow(c, b, k, threshold) for c, b, k in zip(covariances, self.bases, self.kinds)]
        grown = [compact(basis, kind) for basis, kind in grown]
        self.bases = [basis for basis, _ in grown]
        self.kinds = [kind for _, kind in grown]

    @torch.no_grad()
    def input_covariances(self, batches) -> list[torch.Tensor]:
        """Per adapted module, the mean of x x^T over the real (not padding) tokens of `batches`, x the
        module's input, through every task's LoRA summed (the evaluated model)."""
        layers = self.adapters.layers
        for layer in layers:
            if not isinstance(layer, LoraLinear):
                raise ILoRAError(
                    f"InfLoRA designs the down-projections of linear modules only, not {type(layer).__name__}"
                )
        sums = [torch.zeros(layer.in_features, layer.in_features, device=self.device) for layer in layers]
        current: dict[str, torch.Tensor] = {}

        def accumulate(index):
            def hook(module, args):
                rows = args[0][current["mask"]].float()
                sums[index].addmm_(rows.T, rows)

            return hook

        handles = [layer.register_forward_pre_hook(accumulate(i)) for i, layer in enumerate(layers)]
        tokens = 0
        try:
            with self.adapters.active(self.frozen(self.model) + [PLASTIC]):
                for batch in batches:
                    ids = batch["input_ids"].to(self.device)
                    mask = batch["attention_mask"].to(self.device)
                    current["mask"] = mask.bool()
                    tokens += int(mask.sum())
                    self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        if tokens == 0:
            raise ILoRAError("InfLoRA: the task has no tokens to design its LoRA from")
        return [s / tokens for s in sums]

    def state(self):
        if self.bases is None:
            return {}, {}
        return {f"basis.{i}": b for i, b in enumerate(self.bases)}, {"kinds": self.kinds}

    def load_state(self, tensors, record):
        if not record:
            return
        kinds = record.get("kinds")
        widths = [layer.in_features for layer in self.adapters.layers]
        if (
            not isinstance(kinds, list)
            or len(kinds) != len(widths)
            or any(k not in (REMOVE, RETAIN) for k in kinds)
            or any(f"basis.{i}" not in tensors or tensors[f"basis.{i}"].shape[0] != d for i, d in enumerate(widths))
        ):
            raise ILoRAError("InfLoRA: the previous task's subspaces do not match this model's LoRA modules")
        self.bases = [tensors[f"basis.{i}"].to(self.device, torch.float32) for i in range(len(widths))]
        self.kinds = kinds


def unprotected_part(matrix: torch.Tensor, basis: torch.Tensor, kind: str) -> torch.Tensor:
    """The projection of `matrix`'s columns out of the earlier tasks' subspace (onto the free directions)."""
    inside = basis @ (basis.T @ matrix)
    return matrix - inside if kind == REMOVE else inside


def first_basis(covariance: torch.Tensor, threshold: float) -> tuple[torch.Tensor, str]:
    """The leading directions whose cumulative share of the energy stays below `threshold` (at least
    one): the official code's count (GPM's, its `+ 1` left out), so the first task's subspace holds a
    little less than `threshold`; `grow` then adds until it holds `threshold`."""
    left, values, _ = torch.linalg.svd(covariance, full_matrices=False)
    keep = int((torch.cumsum(values / values.sum(), 0) < threshold).sum())
    return left[:, : max(keep, 1)], REMOVE


def grow(covariance: torch.Tensor, basis: torch.Tensor, kind: str, threshold: float) -> tuple[torch.Tensor, str]:
    """DualGPM's update: add the fewest new directions that bring the subspace's share of this task's
    input energy (the covariance's singular values) to `threshold` (REMOVE: appended to the basis;
    RETAIN: taken out of the free directions)."""
    total = torch.linalg.svdvals(covariance).sum()
    left, values, _ = torch.linalg.svd(unprotected_part(covariance, basis, kind), full_matrices=False)
    if kind == REMOVE:  # the share held is what lies inside the subspace
        held = float((total - values.sum()) / total)
        added = _count(values / total, held, lambda share: share < threshold, +1)
        return torch.cat([basis, left[:, :added]], dim=1)[:, : basis.shape[0]], kind
    free = float(values.sum() / total)  # the share still in the free directions
    taken = _count(values / total, free, lambda share: share >= 1 - threshold, -1)
    if taken == 0:
        return basis, kind
    rest = basis - left[:, :taken] @ (left[:, :taken].T @ basis)
    return torch.linalg.svd(rest, full_matrices=True).U[:, : basis.shape[1] - taken], kind


def _count(shares: torch.Tensor, held: float, more, sign: int) -> int:
    """How many leading `shares` to move (each added to `held` with `sign`) while `more(held)`."""
    count = 0
    for share in shares.tolist():
        if not more(held):
            break
        held += sign * share
        count += 1
    return count


def compact(basis: torch.Tensor, kind: str) -> tuple[torch.Tensor, str]:
    """A subspace wider than half the dimension is kept as its complement."""
    dimension, width = basis.shape
    if kind == REMOVE and width > dimension / 2:
        return torch.linalg.svd(basis, full_matrices=True).U[:, width:], RETAIN
    return basis, kind
