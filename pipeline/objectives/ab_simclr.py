"""AB_SimCLR: SimCLR's loss on two augmented annotation views + AB propagation over all M^2 crop pairs.

Annotations l_i are the second SimCLR view of each image in the (global) batch. The teacher (EMA)
scores its target-crop embeddings against its own annotation embeddings; the student scores its
predictions against its own, detached, annotation embeddings, so the propagation loss trains the
predictor and encoder rather than moving the annotation targets it is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.data.boxes import relative_box
from pipeline.models.ab_model import images_to_float
from pipeline.objectives.contrastive import gather_no_grad, symmetric_info_nce
from pipeline.objectives.propagation import propagation_loss, teacher_distribution


@dataclass
class StepOutput:
    loss: torch.Tensor
    annotation: torch.Tensor
    propagation: torch.Tensor
    pred: torch.Tensor  # (B, M, M, P), kept for diagnostics
    teacher_probs: torch.Tensor  # (B, M, N)
    annotations: torch.Tensor  # (N, P) student annotation embeddings (detached)


def pair_actions(boxes: torch.Tensor, null_actions: bool = False) -> torch.Tensor:
    """(B, M, 4) crop boxes in the image frame -> (B, M, M, 4) actions, [b, s, t] = t in s's frame."""
    actions = relative_box(boxes[:, :, None, :], boxes[:, None, :, :])
    return torch.zeros_like(actions) if null_actions else actions


def ab_simclr_step(student: nn.Module, teacher: nn.Module, crops: torch.Tensor, boxes: torch.Tensor, ann_views: torch.Tensor, cfg: ObjectiveConfig) -> StepOutput:
    """Both losses for one batch. Inputs are uint8 NHWC views on the training device."""
    x = images_to_float(crops)  # (B, M, 3, H, W)
    a = images_to_float(ann_views)  # (B, A, 3, H, W)
    actions = pair_actions(boxes.float(), cfg.null_actions)
    pred, ann = student(x, actions, a)
    annotation = symmetric_info_nce(ann[:, 0], ann[:, 1], cfg.temperature)

    b, m = x.shape[:2]
    with torch.no_grad():
        z_targets = teacher.embed(x.flatten(0, 1)).view(b, m, -1)
        z_ann_teacher = gather_no_grad(teacher.embed(a[:, 1]))
        probs = teacher_distribution(z_targets.float(), z_ann_teacher.float(), cfg.temperature)
    z_ann_student = gather_no_grad(ann[:, 1].detach())
    propagation = propagation_loss(pred.float(), probs, z_ann_student.float(), cfg.temperature)
    loss = cfg.annotation_weight * annotation + cfg.propagation_weight * propagation
    return StepOutput(loss, annotation.detach(), propagation.detach(), pred.detach(), probs, z_ann_student)
