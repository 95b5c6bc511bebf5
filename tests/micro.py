"""The smallest model config the tests train: 1-layer, 48-wide ViT on 32 px views (fast on CPU)."""

from __future__ import annotations

from pipeline.config import ModelConfig

MICRO_MODEL = ModelConfig(
    encoder="vit_tiny_patch16_224",
    encoder_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2},
    decoder_depth=1,
    decoder_heads=2,
    proj_dim=32,
    proj_hidden_dim=64,
)
