"""CLIP baseline (Radford et al. 2021): image-text contrastive loss with a learnable logit scale.

Images: the first annotation view (`ann_views[:, 0]`), the annotation stream's image as in AB's
Algorithm 1. With the recipe in jobs/configs/methods/clip.yaml that view is SLIP's CLIP crop
(RandomResizedCrop scale 0.5-1, no colour distortion). Annotations: the `tokens` the crop stage
cut from captions or boxes (`views.text`). Image embedding = linear projection of the ViT's pooled
output (CLIP's `image_projection`); text embedding = open_clip's text tower. Both unit-norm,
scored by exp(s) * <z_img, z_txt> with s learnable (init log(1/0.07)), clipped at 100 after every
step. The loss is the same symmetric InfoNCE over the global batch as AB's annotation loss, gathered
across workers with gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.tokens import build_tokenizer
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import build_encoder, pooled_features
from pipeline.models.text import build_text_encoder
from pipeline.objectives import base
from pipeline.objectives.contrastive import symmetric_info_nce


def clip_loss(z_images: torch.Tensor, z_texts: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of logits exp(log_scale) * z_img @ z_txt.T over the global batch (mean of
    the image->text and text->image cross-entropies). Gradients reach `log_scale` too."""
    return symmetric_info_nce(z_images, z_texts, torch.exp(-log_scale.float()))


def logit_scale_parameter(init: float) -> nn.Parameter:
    """CLIP's learnable log logit scale (a 0-dim parameter: no weight decay in the loop's groups)."""
    return nn.Parameter(torch.tensor(math.log(init)))


@torch.no_grad()
def clamp_logit_scale_(log_scale: nn.Parameter, max_scale: float) -> None:
    log_scale.clamp_(0.0, math.log(max_scale))


def check_text_views(cfg: Config, name: str, num_views: int | None, annotation_views: int) -> None:
    """The crop stage must cut what the method reads: text tokens, `annotation_views` views, and
    `num_views` crops (None: any number >= 1); anything else is either missing or wasted budget."""
    v = cfg.views
    if v.text.source not in ("captions", "boxes"):
        raise ConfigError(
            f"views.text.source must be 'captions' or 'boxes' for {name} (its annotations are text), got "
            f"{v.text.source!r}"
        )
    if v.annotation_views != annotation_views:
        raise ConfigError(f"views.annotation_views must be {annotation_views} for {name}, got {v.annotation_views}")
    if num_views is None and v.num_views < 1:
        raise ConfigError(f"views.num_views must be >= 1 for {name}")
    if num_views is not None and v.num_views != num_views:
        raise ConfigError(
            f"views.num_views must be {num_views} for {name} (other crops would be cut and counted in the budget but "
            f"never used), got {v.num_views}"
        )
    if getattr(v, "local_views", 0):
        raise ConfigError(f"views.local_views must be 0 for {name} (DINO's local crops are not used)")
    tokenizer = build_tokenizer(v.text.tokenizer, v.text.context_length)
    vocab = getattr(tokenizer, "vocab_size", None)
    from pipeline.models.text import text_tower_config

    tower_vocab = text_tower_config(cfg.model, v.text.context_length)["text_cfg"]["vocab_size"]
    if vocab is not None and vocab > tower_vocab:
        raise ConfigError(
            f"views.text.tokenizer {v.text.tokenizer!r} has {vocab} ids but model.text_model {cfg.model.text_model!r} "
            f"embeds {tower_vocab}"
        )


def check_coupled(cfg: Config, name: str) -> None:
    if getattr(cfg.data, "decoupled", False):
        raise ConfigError(
            f"{name} pairs each image with its own text: data.annotation_shards / annotation_mixture (decoupled "
            "streams) are for ab_clip"
        )


class CLIPNet(nn.Module):
    """ViT encoder (built first: the eval job's random-init reference) + image projection + text tower."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = build_encoder(cfg.model, cfg.views.view_size)
        dim = self.encoder.embed_dim
        self.image_projection = nn.Linear(dim, cfg.model.proj_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=dim**-0.5)  # CLIP's init
        self.text = build_text_encoder(cfg.model, cfg.views.text.context_length, cfg.model.proj_dim)
        self.log_scale = logit_scale_parameter(cfg.objective.clip.logit_scale_init)

    def pooled(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> the ViT's pooled output (B, D)."""
        return pooled_features(self.encoder, images_to_float(views))

    def embed_images(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_projection(pooled), dim=-1)


def pair_accuracy(z_images: torch.Tensor, z_texts: torch.Tensor) -> torch.Tensor:
    """Fraction of this worker's images whose own text scores highest among the local texts."""
    with torch.no_grad():
        return ((z_images @ z_texts.T).argmax(-1) == torch.arange(len(z_images), device=z_images.device)).float().mean()


class CLIP(base.Objective):
    """`objective.name: clip`. Reads `ann_views[:, 0]` and `tokens`; views.num_views must be 0."""

    columns = ("ann_views", "tokens")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.net = CLIPNet(cfg)

    def check_views(self) -> None:
        check_text_views(self.cfg, "clip", num_views=0, annotation_views=1)
        check_coupled(self.cfg, "clip")

    @property
    def student_encoder(self) -> nn.Module:
        return self.net.encoder

    def clip_terms(self, images: torch.Tensor, tokens: torch.Tensor):
        """(loss, z_images, z_texts) for uint8 images (B, S, S, 3) and their tokens (B, L)."""
        z_img = self.net.embed_images(self.net.pooled(images)).float()
        z_txt = self.net.text(tokens).float()
        return clip_loss(z_img, z_txt, self.net.log_scale), z_img, z_txt

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        return self.split_forward(batch, progress)

    def embeddings(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> dict[str, torch.Tensor]:
        """The two towers: unit image embeddings of `ann_views[:, 0]` and text embeddings of `tokens`."""
        return {
            "image": self.net.embed_images(self.net.pooled(batch["ann_views"][:, 0])),
            "text": self.net.text(batch["tokens"]),
        }

    def embedding_loss(
        self,
        batch: dict[str, torch.Tensor],
        embeddings: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        progress: base.Progress,
    ) -> base.StepOutput:
        """CLIP's loss; the logit scale gets its gradient here."""
        z_img, z_txt = embeddings["image"].float(), embeddings["text"].float()
        loss = clip_loss(z_img, z_txt, self.net.log_scale)
        metrics = {"logit_scale": self.net.log_scale.detach().exp(), "pair_accuracy": pair_accuracy(z_img, z_txt)}
        diagnostics = {"image": z_img.detach(), "text": z_txt.detach()} if progress.diagnose else {}
        return base.StepOutput(loss, {"clip": loss.detach()}, metrics, diagnostics)

    @torch.no_grad()
    def after_step(self, progress: base.Progress) -> None:
        clamp_logit_scale_(self.net.log_scale, self.cfg.objective.clip.logit_scale_max)

    def image_text_towers(self, which: str = "teacher"):
        """z_img = projection of the pooled ViT output, z_txt = the text tower (no EMA copy: `which` is ignored)."""
        return clip_net_towers(self.net, self.cfg)


def clip_net_towers(net: CLIPNet, cfg: Config):
    """The ContrastiveTowers of a CLIPNet (CLIP, SLIP and SiLC share it)."""
    from pipeline.objectives.towers import ContrastiveTowers

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        return net.embed_images(pooled_features(net.encoder, x))

    t = cfg.views.text
    return ContrastiveTowers(net, image_fn, net.text, net.log_scale, cfg.objective.name, t.tokenizer, t.context_length)
