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


def fit_linear(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    num_classes: int,
    cfg: EvalConfig,
    epochs: int | None = None,
) -> dict[str, float]:
    """Standardise on the train rows, train the linear classifier, score the test rows: top1/top5 and
    train top1 (to show under/over-fitting). The linear and box-linear probes differ only in their rows
    (and `epochs`: default `cfg.linear_epochs`)."""
    ytr_t = torch.as_tensor(np.asarray(ytr), dtype=torch.long)
    xtr_t = torch.as_tensor(np.asarray(xtr), dtype=torch.float32)
    xte_t = torch.as_tensor(np.asarray(xte), dtype=torch.float32)
    mean, std = xtr_t.mean(0), xtr_t.std(0).nan_to_num(1.0).clamp_min(1e-6)  # std of 1 row is NaN
    xtr_t, xte_t = (xtr_t - mean) / std, (xte_t - mean) / std
    with torch.enable_grad():
        layer = train_linear(
            xtr_t, ytr_t, num_classes, epochs or cfg.linear_epochs, cfg.linear_lr, cfg.linear_weight_decay, cfg.seed
        )
    with torch.no_grad():
        metrics = classification_metrics(layer(xte_t).numpy(), np.asarray(yte), num_classes)
        metrics["train_top1"] = float((layer(xtr_t).argmax(1) == ytr_t).float().mean())
    return metrics


def linear_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """A linear classifier on the pooled features of each image."""
    return fit_linear(train.pooled, train.labels, test.pooled, test.labels, task.num_classes, cfg)


LINEAR = Probe("linear", linear_probe, kinds=(CLASSIFICATION,), needs_tokens=False)
