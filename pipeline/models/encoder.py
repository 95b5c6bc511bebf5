"""The ViT encoder every method trains, and the frozen form evaluation reads.

Every pretraining method in abpipe shares this encoder (a randomly initialised timm ViT), so the
eval job needs nothing method-specific: a checkpoint's `encoder_teacher`/`encoder_student` weights
plus the model config rebuild it.
"""

from __future__ import annotations

import os

import timm
import torch
from torch import nn

from pipeline.checkpoints import CheckpointError, checkpoint_config, encoder_state, load_state
from pipeline.config import ModelConfig


def pool_tokens(encoder: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final ViT tokens (B, N, D) -> the pooled encoder output (B, D), by the timm model's own pooling
    (class token or mean, as configured): what linear/kNN probes and the SSL heads read."""
    return encoder.forward_head(tokens, pre_logits=True)


def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalised float images (B, 3, H, W) -> the pooled encoder output (B, D), in one pass."""
    return pool_tokens(encoder, encoder.forward_features(x))


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
        return pooled_features(self.encoder, x)


def load_frozen_model(directory: str | os.PathLike, which: str = "teacher", device: str | torch.device = "cpu"):
    """(FrozenEncoder in eval mode without grads, Config) from a checkpoint directory.

    `which` picks the EMA teacher (default: the smoother weights, as DINO evaluates) or the student;
    methods without a teacher store the student under both names.
    """
    cfg = checkpoint_config(directory)
    state = load_state(directory, map_location=device)
    if which not in ("teacher", "student"):
        raise ValueError("which must be 'teacher' or 'student'")
    model = FrozenEncoder(build_encoder(cfg.model, cfg.views.view_size))
    try:
        model.encoder.load_state_dict(encoder_state(state, which))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model config: {exc}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg
