"""Linear probe: one nn.Linear on frozen, standardised features, trained with AdamW.

Standardising (train-set mean/std) makes a single learning rate work across encoders whose feature
scales differ by orders of magnitude; full-batch steps with a cosine schedule make the result a
deterministic function of (features, seed) rather than of a batch-size/shuffle choice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import CLASSIFICATION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.metrics import classification_metrics

_MAX_BATCH = 65536  # rows per step; below this the probe is full-batch


def train_linear(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, lr: float, weight_decay: float, seed: int
) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's init draws from the global generator
    layer = torch.nn.Linear(x.shape[1], n_classes)
    batch = min(len(x), _MAX_BATCH)
    steps_per_epoch = -(-len(x) // batch)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen) if steps_per_epoch > 1 else torch.arange(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return layer


def linear_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """Test top1/top5 (and train top1, to show under/over-fitting) of a linear classifier on pooled features."""
    ytr = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    xtr = torch.as_tensor(np.asarray(train.pooled), dtype=torch.float32)
    xte = torch.as_tensor(np.asarray(test.pooled), dtype=torch.float32)
    mean, std = xtr.mean(0), xtr.std(0).nan_to_num(1.0).clamp_min(1e-6)  # std of 1 row is NaN
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    with torch.enable_grad():
        layer = train_linear(
            xtr, ytr, task.num_classes, cfg.linear_epochs, cfg.linear_lr, cfg.linear_weight_decay, cfg.seed
        )
    with torch.no_grad():
        metrics = classification_metrics(layer(xte).numpy(), np.asarray(test.labels), task.num_classes)
        metrics["train_top1"] = float((layer(xtr).argmax(1) == ytr).float().mean())
    return metrics


LINEAR = Probe("linear", linear_probe, kinds=(CLASSIFICATION,), needs_tokens=False)
