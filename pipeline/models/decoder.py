"""The action-conditioned transformer decoder: query tokens cross-attend to the frozen-or-not ViT tokens.

For one source crop the decoder answers G questions at once, one per action (a target box in the
source's frame). Each question is a group of 5 query tokens: a learned readout token plus the 4
box-corner tokens. Groups cannot see each other (block-diagonal self-attention), so one pass over
the encoder memory yields all M target predictions of a source crop without repeating the memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.geometry import box_corners

TOKENS_PER_ACTION = 5  # readout + 4 corners


class FourierCornerEmbedding(nn.Module):
    """Fixed Fourier features of each corner's (x, y), projected to the model width."""

    def __init__(self, dim: int, bands: int = 16):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(bands)) * math.pi / 4, persistent=False)
        self.proj = nn.Linear(4 * bands + 2, dim)

    def forward(self, corners: torch.Tensor) -> torch.Tensor:  # (..., 4, 2) -> (..., 4, dim)
        angles = corners[..., None] * self.freqs  # (..., 4, 2, bands)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        return self.proj(torch.cat([feats, corners], dim=-1))


class LearnedCornerEmbedding(nn.Module):
    """Discrete learned embeddings: each coordinate is quantised into bins over [-1, 2]."""

    LOW, HIGH = -1.0, 2.0

    def __init__(self, dim: int, bins: int = 32):
        super().__init__()
        self.bins = bins
        self.x_embed = nn.Embedding(bins, dim)
        self.y_embed = nn.Embedding(bins, dim)

    def forward(self, corners: torch.Tensor) -> torch.Tensor:
        unit = (corners.clamp(self.LOW, self.HIGH) - self.LOW) / (self.HIGH - self.LOW)
        idx = (unit * (self.bins - 1)).round().long()
        return self.x_embed(idx[..., 0]) + self.y_embed(idx[..., 1])


class Attention(nn.Module):
    """Multi-head attention on SDPA (flash/efficient kernels on GPU, math kernel on CPU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x, memory, self_mask):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, self_mask)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class ActionDecoder(nn.Module):
    """(memory tokens of a crop, G actions) -> G readout vectors."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        action_embedding: str = "fourier",
        fourier_bands: int = 16,
        learned_bins: int = 32,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing  # recompute each layer's activations in the backward pass
        if action_embedding == "fourier":
            self.corner_embed: nn.Module = FourierCornerEmbedding(dim, fourier_bands)
        elif action_embedding == "learned":
            self.corner_embed = LearnedCornerEmbedding(dim, learned_bins)
        else:
            raise ValueError(f"model.action_embedding must be 'fourier' or 'learned', got {action_embedding!r}")
        self.corner_index = nn.Parameter(torch.zeros(4, dim))
        self.readout = nn.Parameter(torch.zeros(1, dim))
        self.memory_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.corner_index, std=0.02)
        nn.init.trunc_normal_(self.readout, std=0.02)

    def forward(self, memory: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """memory (B, N, D); actions (B, G, 4) target boxes in the source frame -> (B, G, D)."""
        b, g, _ = actions.shape
        corners = self.corner_embed(box_corners(actions.to(memory.dtype))) + self.corner_index  # (B, G, 4, D)
        readout = self.readout.expand(b, g, 1, -1)
        x = torch.cat([readout, corners], dim=2).flatten(1, 2)  # (B, G*5, D)
        group = torch.arange(g, device=memory.device).repeat_interleave(TOKENS_PER_ACTION)
        self_mask = group[:, None] == group[None, :]  # True = may attend
        memory = self.memory_norm(memory)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # model.grad_checkpointing: the layer's activations are recomputed in the backward pass
                x = checkpoint(layer, x, memory, self_mask, use_reentrant=False)
            else:
                x = layer(x, memory, self_mask)
        return self.norm(x.view(b, g, TOKENS_PER_ACTION, -1)[:, :, 0])
