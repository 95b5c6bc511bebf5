"""SiLC (Naeem et al. 2023): CLIP + DINO-style local-to-global self-distillation on one ViT.

CLIP side: exactly `pipeline.objectives.clip` (linear image projection, open_clip text tower,
learnable logit scale clipped at 100) on the first global view `ann_views[:, 0]` and the `tokens`.
Self-distillation side: the pieces of `pipeline.objectives.dino` (head with weight-normed last
layer, centring, teacher-temperature warm-up, EMA teacher of encoder + head): the EMA teacher sees
the 2 global views (`ann_views`), the student sees only the N `local_views`, and every local view is
trained to match every global view's teacher distribution (local-to-global correspondence).
loss = CLIP + objective.clip.ssl_weight * self-distillation (1.0).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.objectives import base
from pipeline.objectives.clip import (
    CLIPNet,
    check_coupled,
    check_text_views,
    clamp_logit_scale_,
    clip_loss,
    clip_net_towers,
    pair_accuracy,
)
from pipeline.objectives.dino import (
    DinoCentre,
    DinoHead,
    DinoNet,
    dino_loss,
    multicrop_features,
    multicrop_model_config,
    register_last_layer_freeze,
    teacher_temperature,
)
from pipeline.objectives.ema import ema_update, make_teacher


class SiLC(base.Objective):
    """`objective.name: silc`. Reads `ann_views` (2 global views), `local_views` (N >= 1), `tokens`."""

    columns = ("ann_views", "local_views", "tokens")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.objective.dino
        self.net = CLIPNet(dataclasses.replace(cfg, model=multicrop_model_config(cfg.model)))  # encoder first
        self.dino_head = DinoHead(self.net.encoder.embed_dim, d)
        self.teacher = make_teacher(DinoNet(self.net.encoder, self.dino_head))  # copies: the student keeps its own
        self.centre = DinoCentre(d.out_dim, d.center_momentum)
        self._freeze_last_layer = False
        register_last_layer_freeze(self, self.dino_head)

    def check_views(self) -> None:
        v = self.cfg.views
        if v.local_views < 1:
            raise ConfigError(
                f"views.local_views must be >= 1 for silc (the student's local crops), got {v.local_views}"
            )
        check_text_views(
            dataclasses.replace(self.cfg, views=dataclasses.replace(v, local_views=0)),
            "silc",
            num_views=0,
            annotation_views=2,
        )
        check_coupled(self.cfg, "silc")

    @property
    def student_encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def teacher_encoder(self) -> nn.Module:
        return self.teacher.encoder

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        d, cfg = self.cfg.objective.dino, self.cfg.objective
        self._freeze_last_layer = progress.step < int(d.freeze_last_layer_fraction * progress.total_steps)
        encoder = self.net.encoder
        global_view = multicrop_features(encoder, [batch["ann_views"][:, :1]])[0]  # (B, D)
        z_img = self.net.embed_images(global_view).float()
        z_txt = self.net.text(batch["tokens"]).float()
        clip = clip_loss(z_img, z_txt, self.net.log_scale)

        student_logits = self.dino_head(multicrop_features(encoder, [batch["local_views"]]))  # (N, B, K)
        with torch.no_grad():
            teacher_logits = self.teacher([batch["ann_views"]])  # (2, B, K)
        temp = teacher_temperature(progress.step, progress.total_steps, d)
        distill, probs = dino_loss(
            student_logits, teacher_logits, self.centre.center, d.student_temp, temp, skip_same_view=False
        )
        self.centre.update(teacher_logits)
        loss = clip + cfg.clip.ssl_weight * distill
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        metrics = {
            "logit_scale": self.net.log_scale.detach().exp(),
            "pair_accuracy": pair_accuracy(z_img, z_txt),
            "teacher_temp": torch.tensor(temp),
            "teacher_entropy": entropy,
        }
        diagnostics = {"image": z_img.detach(), "text": z_txt.detach()} if progress.diagnose else {}
        return base.StepOutput(loss, {"clip": clip.detach(), "distill": distill.detach()}, metrics, diagnostics)

    @torch.no_grad()
    def after_step(self, progress: base.Progress) -> None:
        clamp_logit_scale_(self.net.log_scale, self.cfg.objective.clip.logit_scale_max)
        ema_update(self.teacher.encoder, self.net.encoder, progress.ema_rate)
        ema_update(self.teacher.head, self.dino_head, progress.ema_rate)

    def image_text_towers(self, which: str = "teacher"):
        """CLIP's towers on the student encoder: the EMA teacher is the DINO branch's and has no image projection."""
        return clip_net_towers(self.net, self.cfg)
