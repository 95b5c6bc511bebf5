"""What every pretraining method looks like to the training loop.

An `Objective` is one nn.Module holding the method's trainable student (encoder, heads, decoder...)
and its non-trainable targets (EMA teacher, DINO centre...), with the loss as its `forward`. The
loop wraps the whole module in DDP once, so each method's single forward is what DDP's hooks see,
and the loop never needs to know which method it runs: it builds, steps, EMA-updates, checkpoints
and logs through this interface. Every method uses the same timm ViT `encoder`, which is all the
eval job loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import Config


@dataclass
class Progress:
    """Where the run is: what schedules (EMA rate, DINO teacher temperature...) depend on."""

    step: int
    total_steps: int
    ema_rate: float | torch.Tensor = 0.0  # after_step gets a 0-d device tensor: 0 on a skipped step
    diagnose: bool = False  # this step is logged: return diagnostics tensors too


@dataclass
class StepOutput:
    """A step's total loss, its detached terms (logged as `loss_<name>`), other detached scalars to
    log as-is (`metrics`, e.g. teacher entropy), and tensors for the logged steps' diagnostics
    (`diagnostics`: (N, D) embeddings for RankMe/std, AB's per-pair error and IoU)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class. Subclasses set `columns`, build `student_encoder` (and `teacher_encoder` when they
    have a teacher) and implement `forward(batch, progress) -> StepOutput`.

    A method whose loss couples the rows of the batch (contrastive losses: every row is another's
    negative) may instead split its forward in three, which is what `train.accum_steps` > 1 needs to give
    the whole batch's gradient while holding the activations of one sub-batch (pipeline/train/accumulate.py):
    `embeddings` (the student's per-row outputs the loss reads, with gradient), `targets` (per-row outputs
    computed without gradient: EMA teacher embeddings) and `embedding_loss` (the StepOutput from the whole
    batch's embeddings and targets; parameters used only here, such as CLIP's logit scale, get their
    gradient from it). Its `forward` is then `embedding_loss(batch, embeddings(batch), targets(batch))`.
    """

    #: batch columns the method reads (the crop stage must produce them)
    columns: tuple[str, ...] = ()
    #: DDP must tolerate parameters without a gradient in some configurations (ablations)
    find_unused_parameters: bool = False

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def embeddings(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        """The student's outputs the loss reads, each (rows of `batch`, ...): one row's depend on that row only."""
        raise NotImplementedError(f"{type(self).__name__} does not split its forward into embeddings + loss")

    def targets(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        """Per-row outputs computed without gradient (an EMA teacher's embeddings); none by default."""
        return {}

    def embedding_loss(
        self,
        batch: dict[str, torch.Tensor],
        embeddings: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        progress: Progress,
    ) -> StepOutput:
        """The step's loss, terms, metrics and diagnostics from the whole batch's embeddings and targets."""
        raise NotImplementedError(f"{type(self).__name__} does not split its forward into embeddings + loss")

    def split_forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> StepOutput:
        """`forward` of a method with the split: student embeddings, then the targets, then the loss."""
        embeddings = self.embeddings(batch, progress)
        return self.embedding_loss(batch, embeddings, self.targets(batch, progress), progress)

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        """Called after each optimiser step (EMA teachers follow the student here)."""

    def encoders(self) -> dict[str, nn.Module]:
        """{"student": timm ViT, "teacher": timm ViT} — what frozen-feature evaluation reads.

        Methods without a teacher return the student under both names.
        """
        student = self.student_encoder
        return {"student": student, "teacher": getattr(self, "teacher_encoder", None) or student}

    @property
    def student_encoder(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_views(self) -> None:
        """Raise ConfigError when the crop stage config cannot feed this method (called at build)."""
