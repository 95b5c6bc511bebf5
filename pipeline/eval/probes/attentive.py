"""Attentive probe: one learned query cross-attends to the frozen tokens, then a linear classifier.

Between the linear probe (a fixed pooling) and the decoder probe (4 layers): the only thing it
learns beyond a linear map is *where to look*, which is what separates token-level representations
(MAE, AB) from ones whose pooled vector already says everything (AB paper, Table 5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import CLASSIFICATION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.eval.probes.training import as_float_tensor, probe_device, train_probe
from pipeline.metrics import classification_metrics


class AttentivePool(nn.Module):
    """(B, T, D) tokens -> (B, C) logits through a single multi-head attention query."""

    def __init__(self, token_dim: int, width: int, heads: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.proj = nn.Linear(token_dim, width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.proj(self.norm(tokens))
        pooled, _ = self.attn(self.query.expand(len(tokens), -1, -1), memory, memory, need_weights=False)
        return self.head(self.out_norm(pooled[:, 0]))


def attentive_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """Test top1 (top5 above 5 classes) and train top1 of the attentive probe."""
    pc, device = cfg.probe, probe_device(cfg)
    torch.manual_seed(cfg.seed)
    model = AttentivePool(train.tokens.shape[2], pc.width, pc.heads, task.num_classes).to(device)
    labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.long, device=device)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        logits = model(as_float_tensor(train.tokens, idx, device))
        return F.cross_entropy(logits, labels[torch.as_tensor(idx, device=device)], label_smoothing=pc.label_smoothing)

    train_probe(model, loss_fn, len(train), pc, cfg.seed)
    test_logits = predict_logits(model, test.tokens, pc.eval_batch_size, device)
    metrics = classification_metrics(test_logits, np.asarray(test.labels), task.num_classes)
    metrics["train_top1"] = float(
        (predict_logits(model, train.tokens, pc.eval_batch_size, device).argmax(1) == np.asarray(train.labels)).mean()
    )
    return metrics


@torch.no_grad()
def predict_logits(model: nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    out = [
        model(as_float_tensor(tokens, np.arange(s, min(s + batch_size, len(tokens))), device)).cpu()
        for s in range(0, len(tokens), batch_size)
    ]
    return torch.cat(out).numpy()


ATTENTIVE = Probe("attentive", attentive_probe, kinds=(CLASSIFICATION,), needs_tokens=True)
