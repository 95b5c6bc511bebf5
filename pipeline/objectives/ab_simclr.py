"""AB_SimCLR: SimCLR's loss on two augmented annotation views + AB propagation over all M^2 crop pairs.

Annotations l_i are the second SimCLR view of each image in the (global) batch. The teacher (EMA)
scores its target-crop embeddings against its own annotation embeddings; the student scores its
predictions against its own annotation embeddings. As in the paper's Eq. 4, where g(x, a, l) =
phi_bar(x, a)^T psi_bar(l) has psi_bar among the trained parameters, the propagation loss trains those
annotation embeddings too (gathered across workers with gradients); `objective.detach_annotations`
freezes them inside this loss instead (measured equal or slightly worse: docs/study.md).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config, ConfigError, ObjectiveConfig
from pipeline.data.pair_sampling import MODES as PAIR_MODES
from pipeline.geometry import box_iou, relative_box
from pipeline.models.ab_model import build_model, images_to_float
from pipeline.objectives import base
from pipeline.objectives.contrastive import gather_no_grad, gather_with_grad, symmetric_info_nce
from pipeline.objectives.ema import ema_update, make_teacher
from pipeline.objectives.propagation import per_pair_error, propagation_loss, teacher_distribution


def propagation_weight(cfg: ObjectiveConfig, progress: base.Progress) -> float:
    """The propagation loss's weight at this step: ramped linearly from 0 over `propagation_warmup` of the run."""
    if cfg.propagation_warmup <= 0:
        return cfg.propagation_weight
    return cfg.propagation_weight * min(1.0, progress.step / (cfg.propagation_warmup * max(progress.total_steps, 1)))


def pair_actions(boxes: torch.Tensor, null_actions: bool = False) -> torch.Tensor:
    """(B, M, 4) crop boxes in the image frame -> (B, M, M, 4) actions, [b, s, t] = t in s's frame."""
    actions = relative_box(boxes[:, :, None, :], boxes[:, None, :, :])
    return torch.zeros_like(actions) if null_actions else actions


def ab_simclr_step(
    student: nn.Module,
    teacher: nn.Module,
    crops: torch.Tensor,
    boxes: torch.Tensor,
    ann_views: torch.Tensor,
    cfg: ObjectiveConfig,
    diagnose: bool = False,
    propagation_weight: float | None = None,
) -> base.StepOutput:
    """Both losses for one batch. Inputs are uint8 NHWC views on the training device.

    Terms `annotation` and `propagation`, metric `teacher_entropy`; with `diagnose`, the per-pair
    propagation error with each pair's box IoU and the annotation embeddings (logged steps only).
    The three parts (student embeddings, teacher targets, loss) are the functions below, which
    gradient accumulation runs separately (pipeline/train/accumulate.py).
    """
    embeddings = ab_simclr_embeddings(student, crops, boxes, ann_views, cfg)
    targets = ab_simclr_targets(teacher, crops, ann_views)
    return ab_simclr_loss(embeddings, targets, boxes, cfg, diagnose, propagation_weight)


def ab_simclr_embeddings(
    student: nn.Module, crops: torch.Tensor, boxes: torch.Tensor, ann_views: torch.Tensor, cfg: ObjectiveConfig
) -> dict[str, torch.Tensor]:
    """The student's single pass: predictions `pred` (B, M, M, P) for every (source, target) pair and the
    annotation embeddings `ann` (B, A, P)."""
    actions = pair_actions(boxes.float(), cfg.null_actions)
    pred, ann = student(images_to_float(crops), actions, images_to_float(ann_views))
    return {"pred": pred, "ann": ann}


@torch.no_grad()
def ab_simclr_targets(teacher: nn.Module, crops: torch.Tensor, ann_views: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's embeddings, without gradient: of each target crop (B, M, P) and of the second
    annotation view (B, P), the annotations its distribution is over."""
    x = images_to_float(crops)
    b, m = x.shape[:2]
    return {
        "crops": teacher.embed(x.flatten(0, 1)).view(b, m, -1),
        "annotations": teacher.embed(images_to_float(ann_views[:, 1])),
    }


def ab_simclr_loss(
    embeddings: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    boxes: torch.Tensor,
    cfg: ObjectiveConfig,
    diagnose: bool = False,
    propagation_weight: float | None = None,
) -> base.StepOutput:
    """Both losses from the batch's student embeddings and teacher targets (their rows: this worker's
    images). The teacher's distribution and the student's scores are over every annotation of the global
    batch (gathered across workers)."""
    propagation_weight = cfg.propagation_weight if propagation_weight is None else propagation_weight
    pred, ann = embeddings["pred"], embeddings["ann"]
    annotation = symmetric_info_nce(ann[:, 0], ann[:, 1], cfg.temperature)
    with torch.no_grad():
        z_ann_teacher = gather_no_grad(targets["annotations"])
        probs = teacher_distribution(targets["crops"].float(), z_ann_teacher.float(), cfg.temperature)
    z_ann_student = gather_no_grad(ann[:, 1].detach()) if cfg.detach_annotations else gather_with_grad(ann[:, 1])
    propagation = propagation_loss(pred.float(), probs, z_ann_student.float(), cfg.temperature)
    loss = cfg.annotation_weight * annotation + propagation_weight * propagation
    terms = {"annotation": annotation.detach(), "propagation": propagation.detach()}
    metrics = {"teacher_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()}
    diagnostics = {}
    if diagnose:
        pair_boxes = boxes.float().cpu().numpy()
        diagnostics = {
            "pair_error": per_pair_error(pred.detach().float(), probs, z_ann_student, cfg.temperature),
            "pair_iou": torch.as_tensor(box_iou(pair_boxes[:, :, None, :], pair_boxes[:, None, :, :])),
            "head": z_ann_student.detach(),
        }
    return base.StepOutput(loss, terms, metrics, diagnostics)


class ABSimCLR(base.Objective):
    """AB_SimCLR as a trainable method, with the paper's Table 4 ablation switches.

    `objective.teacher: student` is the "no target network" ablation (the student, under no_grad,
    produces its own targets); `objective.annotation_weight: 0` removes the grounding loss,
    `objective.propagation_weight: 0` the propagation loss, `objective.null_actions` the action
    tokens, and `views.augment_views` adds augmentations to the propagation crops.
    """

    columns = ("views", "boxes", "ann_views")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.student = build_model(cfg.model, cfg.views.view_size)
        self.use_ema = cfg.objective.teacher == "ema"
        self.teacher = make_teacher(self.student) if self.use_ema else None

    def check_views(self) -> None:
        if self.cfg.views.annotation_views != 2:
            raise ConfigError(
                f"views.annotation_views must be 2 for {self.cfg.objective.name} (SimCLR's two views), got "
                f"{self.cfg.views.annotation_views}"
            )
        if self.cfg.views.num_views < 1:
            raise ConfigError(f"views.num_views must be >= 1 for {self.cfg.objective.name}")
        if self.cfg.views.pair_sampling not in PAIR_MODES:
            raise ConfigError(f"views.pair_sampling must be one of {PAIR_MODES}, got {self.cfg.views.pair_sampling!r}")
        if self.cfg.objective.teacher not in ("ema", "student"):
            raise ConfigError(f"objective.teacher must be 'ema' or 'student', got {self.cfg.objective.teacher!r}")

    @property
    def student_encoder(self) -> nn.Module:
        return self.student.encoder

    @property
    def teacher_encoder(self) -> nn.Module | None:
        return self.teacher.encoder if self.teacher is not None else None

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        return self.split_forward(batch, progress)

    def embeddings(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        return ab_simclr_embeddings(
            self.student, batch["views"], batch["boxes"], batch["ann_views"], self.cfg.objective
        )

    def targets(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        teacher = self.teacher if self.teacher is not None else self.student
        return ab_simclr_targets(teacher, batch["views"], batch["ann_views"])

    def embedding_loss(
        self,
        batch: dict[str, torch.Tensor],
        embeddings: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        progress: base.Progress,
    ) -> base.StepOutput:
        weight = propagation_weight(self.cfg.objective, progress)
        return ab_simclr_loss(embeddings, targets, batch["boxes"], self.cfg.objective, progress.diagnose, weight)

    @torch.no_grad()
    def after_step(self, progress: base.Progress) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.student, progress.ema_rate)
