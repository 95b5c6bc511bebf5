"""SLIP baseline (Mu et al. 2021): CLIP + SimCLR on one shared ViT, loss = CLIP + ssl_weight * SimCLR.

CLIP side: exactly `pipeline.objectives.clip` (linear image projection, open_clip text tower,
learnable logit scale clipped at 100) on the first propagation crop `views[:, 0]`, which is an
un-augmented RandomResizedCrop of `views.scale` (SLIP's CLIP transform: scale 0.5-1, no flip, no
colour). SimCLR side: the two `ann_views` (SimCLR's augmentation) through the encoder and an MLP
projection head, scored with this repo's SimCLR loss (`pipeline.objectives.simclr`: symmetric
InfoNCE, tau = objective.temperature, SLIP's 0.1), so SLIP here is literally CLIP + our SimCLR.
All three images go through the encoder in one pass.
"""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.models.ab_model import ProjectionHead, images_to_float
from pipeline.models.encoder import pooled_features
from pipeline.objectives import base
from pipeline.objectives.clip import CLIP, check_coupled, check_text_views, clip_loss, pair_accuracy
from pipeline.objectives.contrastive import symmetric_info_nce


class SLIP(CLIP):
    """`objective.name: slip`. Reads `views[:, 0]` (CLIP image), `ann_views` (2 SimCLR views), `tokens`."""

    columns = ("views", "ann_views", "tokens")

    def __init__(self, cfg: Config):
        super().__init__(cfg)  # encoder first, then the CLIP heads
        self.ssl_head = ProjectionHead(self.net.encoder.embed_dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim)

    def check_views(self) -> None:
        check_text_views(self.cfg, "slip", num_views=1, annotation_views=2)
        check_coupled(self.cfg, "slip")

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        clip_images, ann = batch["views"][:, 0], batch["ann_views"]
        b = clip_images.shape[0]
        images = torch.cat([clip_images, ann[:, 0], ann[:, 1]])
        encoder = self.net.encoder
        pooled = pooled_features(encoder, images_to_float(images))
        z_img = self.net.embed_images(pooled[:b]).float()
        z_txt = self.net.text(batch["tokens"]).float()
        clip = clip_loss(z_img, z_txt, self.net.log_scale)
        z_ssl = self.ssl_head(pooled[b:]).float()
        simclr = symmetric_info_nce(z_ssl[:b], z_ssl[b:], self.cfg.objective.temperature)
        loss = clip + self.cfg.objective.clip.ssl_weight * simclr
        metrics = {"logit_scale": self.net.log_scale.detach().exp(), "pair_accuracy": pair_accuracy(z_img, z_txt)}
        diagnostics = (
            {"image": z_img.detach(), "text": z_txt.detach(), "head": z_ssl[:b].detach()} if progress.diagnose else {}
        )
        return base.StepOutput(loss, {"clip": clip.detach(), "simclr": simclr.detach()}, metrics, diagnostics)
