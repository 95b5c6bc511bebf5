"""Weighted k-nearest-neighbour probe (Wu et al. 2018, InstDisc; the variant DINO reports).

Cosine similarity on L2-normalised features; each of the k nearest training samples votes for its
class with weight exp(sim / T). No training and no hyper-parameters beyond k and T, which is why it
is the cheapest honest read-out of a frozen representation.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import CLASSIFICATION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.metrics import classification_metrics, knn_predict


def knn_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """top1 (and top5 when there are more than 5 classes) of the weighted kNN vote on pooled features."""
    pred = knn_predict(train.pooled, train.labels, test.pooled, cfg.knn_k, cfg.knn_temperature, topk=5)
    return classification_metrics(pred, np.asarray(test.labels), task.num_classes, ranked=True)


KNN = Probe("knn", knn_probe, kinds=(CLASSIFICATION,), needs_tokens=False)
