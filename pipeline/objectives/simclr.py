"""SimCLR baseline (Chen et al. 2020): two augmented views, ViT -> projection head -> InfoNCE.

This is AB_SimCLR's annotation loss on its own (the AB paper's "SimCLR only" row): the same two
`ann_views`, the same symmetric InfoNCE gathered across workers with gradients
(`pipeline.objectives.contrastive`), but on the encoder's pooled output through a plain MLP
projection head, with no decoder, no crops and no teacher. Like the AB paper's annotation loss, the
negatives of a view are the other image's views only (CLIP form), not NT-Xent's same-view ones.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.models.ab_model import ProjectionHead, images_to_float
from pipeline.models.encoder import build_encoder, pooled_features
from pipeline.objectives import base
from pipeline.objectives.contrastive import symmetric_info_nce


class SimCLR(base.Objective):
    """`objective.name: simclr`; `objective.temperature` is SimCLR's tau (0.1)."""

    columns = ("ann_views",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder = build_encoder(cfg.model, cfg.views.view_size)  # first: the eval job's random-init reference
        self.head = ProjectionHead(self.encoder.embed_dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim)

    def check_views(self) -> None:
        v = self.cfg.views
        if v.annotation_views != 2:
            raise ConfigError(f"views.annotation_views must be 2 for simclr (its two views), got {v.annotation_views}")
        if v.num_views or v.local_views:
            raise ConfigError(
                f"simclr reads only ann_views: set views.num_views=0 and views.local_views=0 (got {v.num_views}, "
                f"{v.local_views}); "
                "other views would be cut and counted in the view budget but never used"
            )

    @property
    def student_encoder(self) -> nn.Module:
        return self.encoder

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 (B, A, S, S, 3) -> unit embeddings (B, A, P)."""
        b, a = views.shape[:2]
        x = images_to_float(views).flatten(0, 1)
        return self.head(pooled_features(self.encoder, x)).view(b, a, -1)

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        return self.split_forward(batch, progress)

    def embeddings(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        return {"z": self.embed(batch["ann_views"])}

    def embedding_loss(
        self,
        batch: dict[str, torch.Tensor],
        embeddings: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        progress: base.Progress,
    ) -> base.StepOutput:
        z = embeddings["z"].float()
        loss = symmetric_info_nce(z[:, 0], z[:, 1], self.cfg.objective.temperature)
        with torch.no_grad():
            accuracy = ((z[:, 0] @ z[:, 1].T).argmax(-1) == torch.arange(len(z), device=z.device)).float().mean()
        diagnostics = {"head": z[:, 0].detach()} if progress.diagnose else {}
        return base.StepOutput(loss, {"contrastive": loss.detach()}, {"pair_accuracy": accuracy}, diagnostics)
