"""The image and text towers of a text-tower method, read back from a checkpoint.

CLIP, SLIP, SiLC and AB_CLIP score an image against a text by exp(s) <z_img, z_txt> with unit-norm
embeddings from two towers. After training, zero-shot classification, image-text retrieval and the
export's text tower all need exactly those two functions, so each method says once how to get them
(`Objective.image_text_towers`) and everything downstream reads a `ContrastiveTowers`:

- CLIP / SLIP / SiLC: z_img = the linear image projection of the ViT's pooled output; z_txt =
  open_clip's text tower. These methods have no EMA copy of the text side, so `which=teacher`
  reads the student (SiLC's EMA teacher is the DINO branch's, which has no image projection).
- AB_CLIP: z_img = phi(x), the identity-action embedding through the decoder and head (paper
  Sec. 4); z_txt = psi(l), the text tower; `which` picks the EMA teacher (default) or the student.

Images go in as `images_to_float` gives them: normalised float (B, 3, H, W). Tokens are int64
(B, views.text.context_length) from `pipeline.data.tokens.build_tokenizer(tokenizer, context_length)`.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from pipeline.checkpoints import CheckpointError, checkpoint_config, load_state
from pipeline.config import Config


class NoTextTower(ValueError):
    """The checkpoint's method has no text tower (SimCLR, DINO, MAE, AB_SimCLR): zero-shot and
    retrieval do not apply to it."""


class ContrastiveTowers(nn.Module):
    """z_img(x) and z_txt(tokens), both unit-norm in the shared space, and the learnt logit scale."""

    def __init__(
        self,
        modules: nn.Module,
        image_fn: Callable[[torch.Tensor], torch.Tensor],
        text: nn.Module,
        log_scale: torch.Tensor,
        method: str,
        tokenizer: str,
        context_length: int,
    ):
        super().__init__()
        self.modules_ = modules  # owns every weight the two functions read (so .to()/.eval() reach them)
        self._image_fn = image_fn
        self.text = text
        self.method = method
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self._tokenizer = None
        self.register_buffer("log_scale", log_scale.detach().float().reshape(()).clone())

    @property
    def logit_scale(self) -> float:
        return float(self.log_scale.exp())

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> unit embeddings (B, P)."""
        return nn.functional.normalize(self._image_fn(x).float(), dim=-1)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 token ids (B, L) -> unit embeddings (B, P)."""
        return nn.functional.normalize(self.text(tokens).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """The training run's own tokenizer on `texts` -> int64 (len(texts), context_length)."""
        from pipeline.data.tokens import build_tokenizer

        if self._tokenizer is None:  # built once: open_clip reads its BPE vocabulary from disk
            self._tokenizer = build_tokenizer(self.tokenizer, self.context_length)
        return torch.as_tensor(self._tokenizer(list(texts)), dtype=torch.long)


def has_text_tower(method: str) -> bool:
    """Whether objective `method` says how to read its image and text towers (`image_text_towers`).
    Raises ConfigError for a method this abpipe does not know."""
    from pipeline.objectives.registry import objective_class

    return hasattr(objective_class(method), "image_text_towers")


def load_towers(directory: str | os.PathLike, which: str = "teacher", device: str | torch.device = "cpu"):
    """(ContrastiveTowers in eval mode without grads, Config) from a checkpoint directory.

    Raises NoTextTower when the method has none, CheckpointError when the weights do not load."""
    from pipeline.objectives.registry import build_objective

    if which not in ("teacher", "student"):
        raise ValueError("which must be 'teacher' or 'student'")
    cfg: Config = checkpoint_config(directory)
    if not has_text_tower(cfg.objective.name):
        raise NoTextTower(
            f"{directory}: objective '{cfg.objective.name}' has no text tower (zero-shot and retrieval read the "
            "image and text towers of clip, slip, silc and ab_clip)"
        )
    objective = build_objective(cfg)
    state = load_state(directory, map_location="cpu")
    if "objective" not in state:
        raise CheckpointError(f"{directory}: the checkpoint has no objective state (text tower weights)")
    try:
        objective.load_state_dict(state["objective"])
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model config: {exc}") from None
    towers = objective.image_text_towers(which)
    towers.to(device).eval()
    for p in towers.parameters():
        p.requires_grad_(False)
    return towers, cfg
