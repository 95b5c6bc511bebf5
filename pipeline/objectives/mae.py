"""MAE (He et al. 2022), also the pre-pretraining stage of MAWS (Singh et al. 2023).

75% of each view's patches are dropped at random; the timm ViT encodes only the visible 25% (its
own class token and position embeddings), and a light transformer decoder, given the encoder's
tokens plus a shared mask token at every dropped position (fixed 2-D sin-cos position embeddings),
predicts the dropped patches' pixels. The loss is the mean squared error on masked patches only,
against pixels normalised by each patch's own mean and variance (MAE's `norm_pix_loss`).
Views: the crop stage's `views` column (RandomResizedCrop, `views.scale` (0.2, 1) as in MAE; no
flip), every view treated as its own image.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.config import Config, ConfigError, MaeConfig
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import CheckpointedBlocks, build_encoder
from pipeline.objectives import base


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches row-major as the ViT's patch embedding."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep indices (B, n_keep), restore order (B, N), mask (B, N) with 1 = dropped), per sample."""
    n_keep = max(1, int(num_patches * (1 - mask_ratio)))
    shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :n_keep] = 0
    return shuffle[:, :n_keep], restore, torch.gather(mask, 1, restore)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Per-patch MSE (B, N, P) averaged over the masked patches (mask 1) only."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # at least fp32 under bf16 autocast
    pred, target = pred.to(dtype), target.to(dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MaeDecoder(nn.Module):
    """Encoder tokens + mask tokens -> per-patch pixels; narrow and shallow (MAE's asymmetry)."""

    def __init__(self, enc_dim: int, grid: tuple[int, int], patch: int, prefix_tokens: int, cfg: MaeConfig):
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.embed = nn.Linear(enc_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer(
            "pos_embed", build_sincos2d_pos_embed(list(grid), dim=cfg.decoder_dim)[None], persistent=False
        )
        self.blocks = nn.Sequential(
            *[Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_dim, patch * patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """tokens (B, prefix + n_keep, D_enc), restore (B, N) -> predictions (B, N, patch*patch*3)."""
        x = self.embed(tokens)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        b, n = restore.shape
        full = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1).to(visible.dtype)], dim=1)
        full = torch.gather(full, 1, restore[..., None].expand(-1, -1, full.shape[-1])) + self.pos_embed.to(full.dtype)
        x = self.norm(self.blocks(torch.cat([prefix, full], dim=1)))
        return self.pred(x[:, self.prefix_tokens :])


class MAE(base.Objective):
    """`objective.name: mae` (`objective.mae.*`: mask ratio, decoder size, norm_pix_loss)."""

    columns = ("views",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder = build_encoder(cfg.model, cfg.views.view_size)  # first: the eval job's random-init reference
        self.patch = self.encoder.patch_embed.patch_size[0]
        grid = tuple(self.encoder.patch_embed.grid_size)
        self.decoder = MaeDecoder(
            self.encoder.embed_dim, grid, self.patch, self.encoder.num_prefix_tokens, cfg.objective.mae
        )
        if cfg.model.grad_checkpointing:  # the decoder's blocks too (model.grad_checkpointing)
            self.decoder.blocks = CheckpointedBlocks(*self.decoder.blocks)
            self.decoder.blocks.checkpointing = True

    def check_views(self) -> None:
        v, m = self.cfg.views, self.cfg.objective.mae
        if v.num_views < 1:
            raise ConfigError(
                f"views.num_views must be >= 1 for mae (each crop is one masked image), got {v.num_views}"
            )
        if v.annotation_views or v.local_views:
            raise ConfigError(
                "mae reads only the `views` crops: set views.annotation_views=0 and views.local_views=0 (got "
                f"{v.annotation_views}, {v.local_views}); "
                "they would be cut and counted in the view budget but never used"
            )
        if not 0.0 <= m.mask_ratio < 1.0:
            raise ConfigError(f"objective.mae.mask_ratio must be in [0, 1), got {m.mask_ratio}")
        if self.encoder.patch_embed.patch_size[0] != self.encoder.patch_embed.patch_size[1] or v.view_size % self.patch:
            raise ConfigError(
                f"mae needs square patches dividing views.view_size={v.view_size}, got patch "
                f"{self.encoder.patch_embed.patch_size}"
            )

    @property
    def student_encoder(self) -> nn.Module:
        return self.encoder

    def encode_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> final tokens of the prefix + kept patches only."""
        enc = self.encoder
        tokens = enc._pos_embed(enc.patch_embed(x))  # (B, prefix + N, D): timm's own position embedding
        p = enc.num_prefix_tokens
        kept = torch.gather(tokens[:, p:], 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        return enc.norm(enc.blocks(enc.norm_pre(torch.cat([tokens[:, :p], kept], dim=1))))

    def forward(self, batch: dict[str, torch.Tensor], progress: base.Progress) -> base.StepOutput:
        x = images_to_float(batch["views"]).flatten(0, 1)  # every crop is one image
        num_patches = self.encoder.patch_embed.num_patches
        keep, restore, mask = random_masking(x.shape[0], num_patches, self.cfg.objective.mae.mask_ratio, x.device)
        latent = self.encode_visible(x, keep)
        pred = self.decoder(latent, restore)
        loss = mae_loss(pred, patchify(x, self.patch), mask, self.cfg.objective.mae.norm_pix_loss)
        # class token of the visible set
        diagnostics = {"latent": latent[:, 0].detach().float()} if progress.diagnose else {}
        return base.StepOutput(loss, {"reconstruction": loss.detach()}, {"mask_fraction": mask.mean()}, diagnostics)
