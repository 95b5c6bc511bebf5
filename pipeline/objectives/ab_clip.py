"""AB_CLIP: CLIP's loss as the annotation loss, AB propagation over the batch's text annotations.

As AB_SimCLR (pipeline/objectives/ab_simclr.py) with the annotation tower swapped for open_clip's
text transformer (paper Sec. 4, "Model"): f(x, l) = exp(s) phi(x)^T psi(l), phi(x) = the AB decoder's
identity-action embedding, psi = the text tower, s CLIP's learnable log logit scale.

- Annotation loss (Eq. 5): CLIP's symmetric InfoNCE between phi(x_i) of the annotation image
  (`ann_views[:, 0]`, the annotation stream's image as in Algorithm 1) and psi(l_i) of its text.
- Propagation loss (Eq. 4): over all M^2 (source, target) pairs of the M crops, the student's
  prediction phi_bar(x_s, bb_{s->t}) is scored against the batch's texts (the student's own text
  embeddings, trained through this loss too as in Eq. 4 unless objective.detach_annotations; at its own
  scale, detached) and matched to the EMA teacher's distribution
  over the same texts (teacher's text tower and scale) for the target crop x_t.
The teacher is an EMA copy of the whole network (image model, text tower and logit scale).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config, ConfigError, ObjectiveConfig
from pipeline.geometry import box_iou
from pipeline.models.ab_model import build_model, images_to_float
from pipeline.models.text import build_text_encoder
from pipeline.objectives import base
from pipeline.objectives.ab_simclr import pair_actions, propagation_weight
from pipeline.objectives.clip import (
    check_text_views,
    clamp_logit_scale_,
    clip_loss,
    logit_scale_parameter,
    pair_accuracy,
)
from pipeline.objectives.contrastive import gather_no_grad, gather_with_grad
from pipeline.objectives.ema import ema_update, make_teacher
from pipeline.objectives.propagation import per_pair_error, propagation_loss, teacher_distribution


class ABCLIPNet(nn.Module):
    """AB image model (ViT built first + action decoder + head) + text tower + log logit scale."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.image = build_model(cfg.model, cfg.views.view_size)
        self.text = build_text_encoder(cfg.model, cfg.views.text.context_length, cfg.model.proj_dim)
        self.log_scale = logit_scale_parameter(cfg.objective.clip.logit_scale_init)

    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.log_scale.float())


def ab_clip_step(
    student: ABCLIPNet,
    teacher: ABCLIPNet,
    crops: torch.Tensor,
    boxes: torch.Tensor,
    ann_views: torch.Tensor,
    tokens: torch.Tensor,
    cfg: ObjectiveConfig,
    diagnose: bool = False,
    propagation_weight: float | None = None,
) -> base.StepOutput:
    """Both losses for one batch: uint8 NHWC crops (B, M) and annotation views (B, 1), tokens (B, L).

    Terms `annotation` and `propagation`; metrics `teacher_entropy`, `logit_scale` and `pair_accuracy`
    (fraction of local images whose own text scores highest among local texts); with `diagnose`, the
    per-pair propagation error with each pair's box IoU and the text and image embeddings. The three
    parts (student embeddings, teacher targets, loss) are the functions below, which gradient
    accumulation runs separately (pipeline/train/accumulate.py).
    """
    embeddings = ab_clip_embeddings(student, crops, boxes, ann_views, tokens, cfg)
    targets = ab_clip_targets(teacher, crops, tokens)
    return ab_clip_loss(student, teacher, embeddings, targets, boxes, cfg, diagnose, propagation_weight)


def ab_clip_embeddings(
    student: ABCLIPNet,
    crops: torch.Tensor,
    boxes: torch.Tensor,
    ann_views: torch.Tensor,
    tokens: torch.Tensor,
    cfg: ObjectiveConfig,
) -> dict[str, torch.Tensor]:
    """The student's pass: predictions `pred` (B, M, M, P), phi of the annotation image `image` (B, P)
    and psi of its text `text` (B, P)."""
    actions = pair_actions(boxes.float(), cfg.null_actions)
    pred, img = student.image(images_to_float(crops), actions, images_to_float(ann_views))
    return {"pred": pred, "image": img[:, 0], "text": student.text(tokens)}


@torch.no_grad()
def ab_clip_targets(teacher: ABCLIPNet, crops: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's embeddings, without gradient: of each target crop (B, M, P) and of each text (B, P)."""
    x = images_to_float(crops)
    b, m = x.shape[:2]
    return {"crops": teacher.image.embed(x.flatten(0, 1)).view(b, m, -1).float(), "texts": teacher.text(tokens).float()}


def ab_clip_loss(
    student: ABCLIPNet,
    teacher: ABCLIPNet,
    embeddings: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    boxes: torch.Tensor,
    cfg: ObjectiveConfig,
    diagnose: bool = False,
    propagation_weight: float | None = None,
) -> base.StepOutput:
    """Both losses from the batch's student embeddings and teacher targets; the student's logit scale gets
    its gradient here. The teacher's distribution and the student's scores are over every text of the
    global batch (gathered across workers)."""
    pred = embeddings["pred"]
    z_img = embeddings["image"].float()
    z_txt = embeddings["text"].float()
    annotation = clip_loss(z_img, z_txt, student.log_scale)
    with torch.no_grad():
        z_txt_teacher = gather_no_grad(targets["texts"])
        probs = teacher_distribution(targets["crops"], z_txt_teacher, teacher.temperature())
    # Eq. 4's psi-bar (the text tower) is trained by the propagation loss too, unless objective.detach_annotations
    z_txt_student = gather_no_grad(z_txt.detach()) if cfg.detach_annotations else gather_with_grad(z_txt)
    propagation = propagation_loss(pred.float(), probs, z_txt_student, student.temperature().detach())
    weight = cfg.propagation_weight if propagation_weight is None else propagation_weight
    loss = cfg.annotation_weight * annotation + weight * propagation
    terms = {"annotation": annotation.detach(), "propagation": propagation.detach()}
    metrics = {
        "teacher_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(),
        "logit_scale": student.log_scale.detach().exp(),
        "pair_accuracy": pair_accuracy(z_img.detach(), z_txt.detach()),
    }
    diagnostics = {}
    if diagnose:
        pair_boxes = boxes.float().cpu().numpy()
        diagnostics = {
            "pair_error": per_pair_error(
                pred.detach().float(), probs, z_txt_student.detach(), student.temperature().detach()
            ),
            "pair_iou": torch.as_tensor(box_iou(pair_boxes[:, :, None, :], pair_boxes[:, None, :, :])),
            "head": z_txt_student.detach(),
            "image": z_img.detach(),
        }
    return base.StepOutput(loss, terms, metrics, diagnostics)


class ABCLIP(base.Objective):
    """`objective.name: ab_clip`, with AB_SimCLR's ablation switches (teacher, weights, null_actions)."""

    columns = ("views", "boxes", "ann_views", "tokens")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.student = ABCLIPNet(cfg)
        self.use_ema = cfg.objective.teacher == "ema"
        self.teacher = make_teacher(self.student) if self.use_ema else None
        # a zero-weighted loss leaves its tower without gradients; DDP must then not wait for them
        self.find_unused_parameters = cfg.objective.annotation_weight == 0 or cfg.objective.propagation_weight == 0

    def check_views(self) -> None:
        check_text_views(self.cfg, "ab_clip", num_views=None, annotation_views=1)
        if self.cfg.objective.teacher not in ("ema", "student"):
            raise ConfigError(f"objective.teacher must be 'ema' or 'student', got {self.cfg.objective.teacher!r}")

    @property
    def student_encoder(self) -> nn.Module:
        return self.student.image.encoder

    @property
    def teacher_encoder(self) -> nn.Module | None:
        return self.teacher.image.encoder if self.teacher is not None else None

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        return self.split_forward(batch, progress)

    def embeddings(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        b = batch
        return ab_clip_embeddings(self.student, b["views"], b["boxes"], b["ann_views"], b["tokens"], self.cfg.objective)

    def targets(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        return ab_clip_targets(self._target_net(), batch["views"], batch["tokens"])

    def embedding_loss(
        self,
        batch: dict[str, torch.Tensor],
        embeddings: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        progress: base.Progress,
    ) -> base.StepOutput:
        weight = propagation_weight(self.cfg.objective, progress)
        return ab_clip_loss(
            self.student,
            self._target_net(),
            embeddings,
            targets,
            batch["boxes"],
            self.cfg.objective,
            progress.diagnose,
            weight,
        )

    def _target_net(self) -> ABCLIPNet:
        """The EMA teacher, or the student itself (`objective.teacher: student`)."""
        return self.teacher if self.teacher is not None else self.student

    @torch.no_grad()
    def after_step(self, progress: base.Progress) -> None:
        clamp_logit_scale_(self.student.log_scale, self.cfg.objective.clip.logit_scale_max)
        if self.teacher is not None:
            ema_update(self.teacher, self.student, progress.ema_rate)

    def image_text_towers(self, which: str = "teacher"):
        """z_img = phi(x), the identity-action embedding through decoder and head; z_txt = psi(l), the text
        tower; both from the EMA teacher (`which=teacher`, when there is one) or the student."""
        from pipeline.objectives.towers import ContrastiveTowers

        net = self.teacher if which == "teacher" and self.teacher is not None else self.student
        t = self.cfg.views.text
        return ContrastiveTowers(
            net, net.image.embed, net.text, net.log_scale, self.cfg.objective.name, t.tokenizer, t.context_length
        )
