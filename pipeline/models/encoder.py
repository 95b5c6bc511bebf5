"""The ViT encoder every method trains, and the frozen form evaluation reads.

Every pretraining method in abpipe shares this encoder (a randomly initialised timm ViT), so the
eval job needs nothing method-specific: a checkpoint's `encoder_teacher`/`encoder_student` weights
plus the model config rebuild it.
"""

from __future__ import annotations

import dataclasses
import os

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.checkpoints import CheckpointError, checkpoint_config, encoder_state, load_state
from pipeline.config import ModelConfig


def pool_tokens(encoder: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final ViT tokens (B, N, D) -> the pooled encoder output (B, D), by the timm model's own pooling
    (class token or mean, as configured): what linear/kNN probes and the SSL heads read."""
    return encoder.forward_head(tokens, pre_logits=True)


def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalised float images (B, 3, H, W) -> the pooled encoder output (B, D), in one pass."""
    return pool_tokens(encoder, encoder.forward_features(x))


def checkpointing_active(module: nn.Module) -> bool:
    """Whether a checkpointed module recomputes now: training and building a graph (no EMA teacher, no eval)."""
    return module.training and torch.is_grad_enabled()


class CheckpointedBlocks(nn.Sequential):
    """timm's `blocks` container that checkpoints each block when called directly (`encoder.blocks(x)`).

    timm's own `set_grad_checkpointing` covers `forward_features` (its `checkpoint_seq` runs the children, not
    this `forward`), but callers that run the blocks themselves (MAE's visible-token pass) would escape it.
    Same children, same names (`blocks.0...`), so state dicts and timm exports are unchanged.
    """

    checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointing and checkpointing_active(self)):
            return super().forward(x)
        for block in self:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def set_grad_checkpointing(encoder: nn.Module, enable: bool = True) -> nn.Module:
    """Activation checkpointing of every transformer block of a timm ViT (`model.grad_checkpointing`), in place:
    each block's activations are recomputed in the backward pass instead of kept from the forward pass."""
    encoder.set_grad_checkpointing(enable)
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.Sequential) and not isinstance(blocks, CheckpointedBlocks):
        encoder.blocks = blocks = CheckpointedBlocks(*blocks)
    if isinstance(blocks, CheckpointedBlocks):
        blocks.checkpointing = enable
    return encoder


def build_encoder(cfg: ModelConfig, img_size: int) -> nn.Module:
    """A randomly initialised timm ViT (never downloads weights) sized for `img_size` views, with activation
    checkpointing of its blocks when `cfg.grad_checkpointing` (no parameter or initialisation changes)."""
    kwargs = {"img_size": img_size, **cfg.encoder_kwargs}
    encoder = timm.create_model(cfg.encoder, pretrained=False, num_classes=0, **kwargs)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(encoder)
    return encoder


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
    model = FrozenEncoder(build_encoder(dataclasses.replace(cfg.model, grad_checkpointing=False), cfg.views.view_size))
    try:
        model.encoder.load_state_dict(encoder_state(state, which))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model config: {exc}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg
