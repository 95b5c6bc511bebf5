"""Metrics: top-k accuracy, COCO box mAP (pycocotools), RankMe.

A shared service: the eval probes report all three, and training's collapse diagnostics
(objectives/diagnostics.py) the same RankMe, so it sits below both.

Boxes reach this module as xyxy in the image's [0, 1] frame. COCO's evaluator works in pixels and
buckets objects by pixel area, so boxes are scaled into a fixed `COCO_FRAME`-pixel square first:
the "all areas" mAP does not depend on that size, and every image gets the same frame.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

COCO_FRAME = 1000.0  # pixels per unit of the [0, 1] box frame handed to COCOeval
RANKME_EPS = 1e-7  # Garrido et al. (2023), eq. for p_k


def topk_accuracy(ranked: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the first k columns of `ranked` (N, >=k) class ids."""
    ranked, labels = np.asarray(ranked), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return float((ranked[:, :k] == labels[:, None]).any(axis=1).mean())


def classification_metrics(
    scores_or_ranked: np.ndarray, labels: np.ndarray, num_classes: int, ranked: bool = False
) -> dict[str, float]:
    """`top1`, plus `top5` when there are more than 5 classes (below that, top5 is always 1)."""
    order = np.asarray(scores_or_ranked) if ranked else np.argsort(-np.asarray(scores_or_ranked), axis=1, kind="stable")
    out = {"top1": topk_accuracy(order, labels, 1)}
    if num_classes > 5:
        out["top5"] = topk_accuracy(order, labels, 5)
    return out


def _to_coco_xywh(box: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) * COCO_FRAME for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_map(
    gt_boxes: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    pred_boxes: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    num_classes: int,
) -> dict[str, float]:
    """COCO box mAP of per-image predictions: `map` (IoU .50:.95), `map50`, `map75`.

    Every argument is a per-image list (one entry per test image, possibly empty). Classes with no
    ground-truth object are left out of the mean, as COCOeval does. Raises when the split has no
    ground-truth object at all (the mean would be over nothing).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n = len(gt_boxes)
    if not (len(gt_labels) == len(pred_boxes) == len(pred_labels) == len(pred_scores) == n):
        raise ValueError("coco_map: every per-image list must have one entry per image")
    images = [{"id": i + 1, "width": COCO_FRAME, "height": COCO_FRAME} for i in range(n)]
    annotations, detections = [], []
    for i in range(n):
        for box, label in zip(np.asarray(gt_boxes[i]).reshape(-1, 4), np.asarray(gt_labels[i]).reshape(-1)):
            xywh = _to_coco_xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
        for box, label, score in zip(
            np.asarray(pred_boxes[i]).reshape(-1, 4),
            np.asarray(pred_labels[i]).reshape(-1),
            np.asarray(pred_scores[i]).reshape(-1),
        ):
            detections.append(
                {"image_id": i + 1, "category_id": int(label) + 1, "bbox": _to_coco_xywh(box), "score": float(score)}
            )
    if not annotations:
        raise ValueError("coco_map: the test split has no ground-truth boxes, so mAP is undefined")
    if not detections:  # COCO.loadRes cannot take an empty list; nothing detected means AP 0
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2])}


def rankme(features: np.ndarray) -> float:
    """Effective rank of an (N, D) embedding matrix (Garrido et al. 2023): exp(entropy of the
    L1-normalised singular values). Label-free; ranges over [1, min(N, D)]."""
    import torch

    z = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme needs a non-empty (N, D) matrix, got shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(z)
    if float(s.sum()) == 0.0:
        return 0.0  # an all-zero matrix: rank 0 (p would be 0/0)
    p = s / s.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


_CHUNK = 1024  # test rows per similarity block: bounds memory at chunk x n_train


def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07, topk: int = 1) -> np.ndarray:
    """Class indices (n_test, topk) ranked by the weighted kNN vote (cosine similarity on L2-normalised
    features, each of the k nearest training samples voting exp(sim / T) for its class); `train_y` are ints
    in [0, C). The eval job's kNN probe and the training loop's online probe both read out with it."""
    import torch
    import torch.nn.functional as F

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
