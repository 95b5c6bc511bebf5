"""DINO (Caron et al. 2021): self-distillation with a centred, sharpened EMA teacher and multi-crop.

The teacher (EMA of the student, momentum 0.996 -> 1 on a cosine, i.e. the project's
`ema_rate` 0.004 -> 0) sees the 2 global views (`ann_views`); the student sees those and the N
small `local_views`. Each student view is trained to match the teacher's softmax over K prototypes
for every *other* global view. Collapse is avoided by two opposite forces on the teacher's output:
centring (subtracting a running mean of its logits, shared across workers) and sharpening (a low
teacher temperature, warmed up linearly). The pieces here (head, loss, centre, schedule, multi-crop
forward) are reused by SiLC.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.config import Config, ConfigError, DinoConfig, ModelConfig
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import build_encoder, pooled_features
from pipeline.objectives import base
from pipeline.objectives.contrastive import world
from pipeline.objectives.ema import ema_update, make_teacher


def multicrop_model_config(model: ModelConfig) -> ModelConfig:
    """The run's model config with timm's `dynamic_img_size`, so one ViT takes global and local views.

    The flag only resamples the position embeddings on the fly: parameter names and shapes are
    unchanged, so the eval job's `build_encoder(cfg.model, view_size)` loads these weights as-is.
    """
    return dataclasses.replace(model, encoder_kwargs={**model.encoder_kwargs, "dynamic_img_size": True})


class DinoHead(nn.Module):
    """MLP (dim -> hidden -> ... -> bottleneck), l2-normalise, weight-normed linear to K prototypes.

    With `norm_last_layer` the weight norm's g is fixed at 1, so logits are cosine similarities to
    the prototypes times ||bottleneck||=1, bounded whatever the optimiser does (DINO's stabiliser).
    """

    def __init__(self, dim: int, cfg: DinoConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(max(cfg.head_layers - 1, 0)):
            layers += [nn.Linear(width, cfg.hidden_dim), nn.GELU()]
            width = cfg.hidden_dim
        layers.append(nn.Linear(width, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not cfg.norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.last_layer.parameters() if p.requires_grad]


def teacher_temperature(step: int, total_steps: int, cfg: DinoConfig) -> float:
    """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over the first fraction of steps."""
    warm = int(cfg.teacher_temp_warmup_fraction * total_steps)
    if warm <= 0 or step >= warm:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    skip_same_view: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, teacher probabilities).

    student_logits (V_s, B, K): the global views first, in the teacher's order, then the locals;
    teacher_logits (V_t, B, K). Cross-entropy of every student view against every teacher view of
    a *different* crop, averaged over the batch and over those (V_t * V_s - V_t) pairs. With
    `skip_same_view=False` every pair counts (SiLC: the student sees only local crops).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32 under bf16 autocast
    probs = F.softmax((teacher_logits.to(dtype) - center.to(dtype)) / teacher_temp, dim=-1).detach()
    log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)
    v_t, v_s = probs.shape[0], log_p.shape[0]
    ce = -torch.einsum("ibk,vbk->iv", probs, log_p) / probs.shape[1]  # (V_t, V_s) batch-mean CE
    if not skip_same_view:
        return ce.mean(), probs
    same = torch.eye(v_t, v_s, dtype=torch.bool, device=ce.device)
    return ce[~same].mean(), probs


class DinoCentre(nn.Module):
    """Running mean of the teacher's logits (a buffer: checkpointed, identical on every worker)."""

    def __init__(self, out_dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Fold in this step's mean teacher logit over every view and the *global* batch."""
        flat = teacher_logits.detach().float().flatten(0, -2)
        total = flat.sum(0, keepdim=True)
        count = torch.full((), float(flat.shape[0]), device=flat.device)  # a fill, not a blocking upload
        _, size = world()
        if size > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


def multicrop_features(encoder: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Each uint8 (B, V_i, s_i, s_i, 3) group (one size each) -> pooled ViT output (sum V_i, B, D).

    One encoder pass per resolution (as DINO's MultiCropWrapper), view-major like DINO's chunks.
    """
    out = []
    for group in views:
        b, v = group.shape[:2]
        x = images_to_float(group).transpose(0, 1).flatten(0, 1)  # (V*B, 3, s, s)
        out.append(pooled_features(encoder, x).view(v, b, -1))
    return torch.cat(out, dim=0)


class DinoNet(nn.Module):
    """ViT + DINO head; `forward` embeds views of several sizes into prototype logits."""

    def __init__(self, encoder: nn.Module, head: DinoHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @classmethod
    def build(cls, model: ModelConfig, view_size: int, cfg: DinoConfig) -> "DinoNet":
        encoder = build_encoder(multicrop_model_config(model), view_size)  # first: the eval job's random-init reference
        return cls(encoder, DinoHead(encoder.embed_dim, cfg))

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        return multicrop_features(self.encoder, views)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(views))


class DINO(base.Objective):
    """`objective.name: dino`. Globals: `ann_views` (A=2, `views.annotation_scale` (0.4, 1) per DINO);
    locals: `local_views` (`views.local_views` N, `local_size` 96, `local_scale` (0.05, 0.4))."""

    columns = ("ann_views", "local_views")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.objective.dino
        self.student = DinoNet.build(cfg.model, cfg.views.view_size, d)
        self.teacher = make_teacher(self.student)
        self.centre = DinoCentre(d.out_dim, d.center_momentum)
        self._freeze_last_layer = False
        register_last_layer_freeze(self, self.student.head)

    def check_views(self) -> None:
        check_dino_views(self.cfg)

    @property
    def student_encoder(self) -> nn.Module:
        return self.student.encoder

    @property
    def teacher_encoder(self) -> nn.Module:
        return self.teacher.encoder

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        d = self.cfg.objective.dino
        self._freeze_last_layer = progress.step < int(d.freeze_last_layer_fraction * progress.total_steps)
        out = dino_step(self.student, self.teacher, self.centre, batch, progress, d)
        return base.StepOutput(out["loss"], {"dino": out["loss"].detach()}, out["metrics"], out["diagnostics"])

    @torch.no_grad()
    def after_step(self, progress: base.Progress) -> None:
        ema_update(self.teacher, self.student, progress.ema_rate)


def register_last_layer_freeze(objective: nn.Module, head: DinoHead) -> None:
    """Zero the last layer's gradients while `objective._freeze_last_layer` is set (DINO freezes it
    for the first epoch). With a weight-normed layer AdamW's decay then only rescales v, so the
    layer's output is unchanged."""
    for p in head.last_layer_parameters():
        p.register_hook(lambda grad: torch.zeros_like(grad) if objective._freeze_last_layer else grad)


def check_dino_views(cfg: Config) -> None:
    """DINO-style self-distillation needs exactly 2 global views, and no AB crops."""
    v = cfg.views
    name = cfg.objective.name
    if v.annotation_views != 2:
        raise ConfigError(
            f"views.annotation_views must be 2 for {name} (DINO's two global views), got {v.annotation_views}"
        )
    if v.num_views:
        raise ConfigError(
            f"{name} does not read the AB crops: set views.num_views=0 (got {v.num_views}); they would be cut and "
            "counted in the view budget but never used"
        )
    if v.local_views < 0 or (v.local_views and v.local_size < 1):
        raise ConfigError(
            f"views.local_views / views.local_size must be >= 0 / >= 1, got {v.local_views} / {v.local_size}"
        )


def dino_step(
    student: DinoNet,
    teacher: DinoNet,
    centre: DinoCentre,
    batch: dict[str, torch.Tensor],
    progress: base.Progress,
    d: DinoConfig,
) -> dict:
    """Loss, logged scalars and diagnostics of one DINO step; updates the centre."""
    views = [batch["ann_views"]] + (
        [batch["local_views"]] if "local_views" in batch and batch["local_views"].shape[1] else []
    )
    z = student.head.bottleneck(student.features(views))
    student_logits = student.head.last_layer(z)
    with torch.no_grad():
        teacher_logits = teacher([batch["ann_views"]])
    temp = teacher_temperature(progress.step, progress.total_steps, d)
    loss, probs = dino_loss(student_logits, teacher_logits, centre.center, d.student_temp, temp)
    centre.update(teacher_logits)
    with torch.no_grad():
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = probs.flatten(0, 1).mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()  # high = prototypes used evenly
    metrics = {"teacher_temp": torch.tensor(temp), "teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy}
    diagnostics = {"head": z[0].detach().float()} if progress.diagnose else {}  # first global view's bottleneck
    return {"loss": loss, "metrics": metrics, "diagnostics": diagnostics}
