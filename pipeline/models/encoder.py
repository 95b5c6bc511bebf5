"""The ViT encoder every method trains, and the frozen form evaluation reads.

Every pretraining method in abpipe shares this encoder (a randomly initialised timm ViT), so the
eval job needs nothing method-specific: a checkpoint's `encoder_teacher`/`encoder_student` weights
plus the model config rebuild it.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from pipeline.config import ModelConfig


def build_encoder(cfg: ModelConfig, img_size: int) -> nn.Module:
    """A randomly initialised timm ViT (never downloads weights) sized for `img_size` views."""
    kwargs = {"img_size": img_size, **cfg.encoder_kwargs}
    return timm.create_model(cfg.encoder, pretrained=False, num_classes=0, **kwargs)


class FrozenEncoder(nn.Module):
    """A trained ViT for read-out: `encode` gives its final tokens (decoder/attentive probes),
    `encoder_features` its pooled output (linear/kNN probes)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> final ViT tokens (B, N, D), prefix tokens included."""
        return self.encoder.forward_features(x)

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output (B, D), the timm model's own pooling (class token or mean)."""
        return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
