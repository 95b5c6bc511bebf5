"""The AB network: timm ViT encoder -> action decoder -> projection head (unit-norm embeddings).

`phi(x)` (the plain image representation) is the decoder's answer for the identity action, so the
annotation loss and the propagation loss share every weight, as in the paper.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.geometry import IDENTITY_BOX
from pipeline.models.decoder import ActionDecoder
from pipeline.models.encoder import build_encoder, pooled_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProjectionHead(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1)


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (3, 1, 1) tensors on `device`, made once: uploading them from Python
    lists at every call would make the host wait for the GPU (a blocking copy) several times a step."""
    with torch.inference_mode(False), torch.no_grad():
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return mean, std


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) as shipped by the CPU workers -> normalised float (..., 3, H, W) on device."""
    x = images.movedim(-1, -3).float().div_(255.0)
    mean, std = _normalisation(x.device)
    return (x - mean) / std


class ABModel(nn.Module):
    def __init__(self, cfg: ModelConfig, img_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg, img_size)
        dim = self.encoder.embed_dim
        self.decoder = ActionDecoder(
            dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
            cfg.action_embedding,
            cfg.fourier_bands,
            cfg.learned_action_bins,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        self.head = ProjectionHead(dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.register_buffer("identity_action", torch.tensor([[IDENTITY_BOX]]), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> ViT tokens (B, N, D)."""
        return self.encoder.forward_features(x)

    def predict(self, memory: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Memory (B, N, D) and actions (B, G, 4) -> unit embeddings (B, G, proj_dim)."""
        return self.head(self.decoder(memory, actions))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): the identity-action embedding (B, proj_dim)."""
        memory = self.encode(x)
        return self.predict(memory, self.identity_action.expand(x.shape[0], 1, 4))[:, 0]

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output (B, D): what frozen-feature probes read."""
        return pooled_features(self.encoder, x)

    def forward(self, crops: torch.Tensor, actions: torch.Tensor, ann_views: torch.Tensor):
        """One student pass for a training step (a single forward, so DDP hooks see every weight).

        crops (B, M, 3, H, W); actions (B, M, M, 4) = target t in source s's frame at [b, s, t];
        ann_views (B, A, 3, H, W). Returns (pred (B, M, M, P), ann (B, A, P)).
        """
        b, m = crops.shape[:2]
        memory = self.encode(crops.flatten(0, 1))  # (B*M, N, D)
        pred = self.predict(memory, actions.flatten(0, 1)).view(b, m, m, -1)
        a = ann_views.shape[1]
        ann = self.embed(ann_views.flatten(0, 1)).view(b, a, -1)
        return pred, ann


def build_model(cfg: ModelConfig, img_size: int) -> ABModel:
    return ABModel(cfg, img_size)
