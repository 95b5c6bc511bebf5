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
    have a teacher) and implement `forward(batch, progress) -> StepOutput`."""

    #: batch columns the method reads (the crop stage must produce them)
    columns: tuple[str, ...] = ()
    #: DDP must tolerate parameters without a gradient in some configurations (ablations)
    find_unused_parameters: bool = False

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

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
