"""The annotation tower for text annotations (CLIP, SLIP, AB_CLIP): open_clip's text transformer.

Built from one of open_clip's bundled model configs (`model.text_model`, default ViT-S-16: the
S-size text tower of the AB paper) and always randomly initialised, so nothing is ever downloaded.
The tokenizer (pipeline/data/tokens.py) is open_clip's bundled BPE, also offline; it runs on the CPU
crop actors so the trainer only ever receives int64 token ids.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, ModelConfig


def text_tower_config(cfg: ModelConfig, context_length: int) -> dict[str, Any]:
    """open_clip's `text_cfg` of `cfg.text_model`, with `cfg.text_kwargs` and the context length applied."""
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.text_model)
    if model_cfg is None or "text_cfg" not in model_cfg:
        raise ConfigError(
            f"model.text_model: {cfg.text_model!r} is not an open_clip model config with a text tower (see "
            "open_clip.list_models())"
        )
    if "context_length" in cfg.text_kwargs:
        raise ConfigError(
            "model.text_kwargs.context_length: set views.text.context_length instead (the tokenizer and the tower must "
            "agree)"
        )
    text_cfg = {**model_cfg["text_cfg"], **cfg.text_kwargs, "context_length": int(context_length)}
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(
            f"model.text_model: {cfg.text_model!r} uses a Hugging Face text model, which would be downloaded; pick a "
            "native open_clip tower"
        )
    return {"text_cfg": text_cfg, "quick_gelu": bool(model_cfg.get("quick_gelu", False))}


class TextEncoder(nn.Module):
    """Token ids (B, L) int64 -> unit-norm text embeddings (B, output_dim): psi(l)."""

    def __init__(self, cfg: ModelConfig, context_length: int, output_dim: int):
        super().__init__()
        from open_clip.model import _build_text_tower

        spec = text_tower_config(cfg, context_length)
        self.context_length = int(context_length)
        self.vocab_size = int(spec["text_cfg"]["vocab_size"])
        self.transformer = _build_text_tower(output_dim, spec["text_cfg"], quick_gelu=spec["quick_gelu"])
        if cfg.grad_checkpointing:  # open_clip's own: each residual block under torch.utils.checkpoint (non-reentrant)
            self.transformer.set_grad_checkpointing(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.context_length:
            raise ValueError(
                f"tokens have length {tokens.shape[-1]}, the text tower expects "
                f"views.text.context_length={self.context_length}"
            )
        return F.normalize(self.transformer(tokens.long()), dim=-1)


def build_text_encoder(cfg: ModelConfig, context_length: int, output_dim: int) -> TextEncoder:
    return TextEncoder(cfg, context_length, output_dim)
