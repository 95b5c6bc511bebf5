"""Weighted k-nearest-neighbour probe (Wu et al. 2018, InstDisc; the variant DINO reports).

Cosine similarity on L2-normalised features; each of the k nearest training samples votes for its
class with weight exp(sim / T). No training and no hyper-parameters beyond k and T, which is why it
is the cheapest honest read-out of a frozen representation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import CLASSIFICATION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.metrics import classification_metrics

_CHUNK = 1024  # test rows per similarity block: bounds memory at chunk x n_train


def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07, topk: int = 1) -> np.ndarray:
    """Class indices (n_test, topk) ranked by weighted vote; `train_y` are ints in [0, C)."""
    train = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    n_classes = int(labels.max()) + 1
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], _CHUNK):
        sim, idx = (test[start : start + _CHUNK] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes).scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.topk(min(topk, n_classes), dim=1).indices)
    return torch.cat(out).numpy()


def knn_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """top1 (and top5 when there are more than 5 classes) of the weighted kNN vote on pooled features."""
    pred = knn_predict(train.pooled, train.labels, test.pooled, cfg.knn_k, cfg.knn_temperature, topk=5)
    return classification_metrics(pred, np.asarray(test.labels), task.num_classes, ranked=True)


KNN = Probe("knn", knn_probe, kinds=(CLASSIFICATION,), needs_tokens=False)
