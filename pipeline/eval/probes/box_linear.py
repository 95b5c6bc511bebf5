"""Box linear probe: the mean of the frozen patch tokens inside each box, then the linear probe's classifier.

A cheap readout of what an encoder's tokens at an object say about its class, next to the decoder probe
on box classification. On small objects the decoder probe can read the class out of a random encoder's
tokens about as well as out of a pretrained one (the scenes study, docs/study.md); this readout has no
capacity of its own to hide the features' differences. A box pools the patches whose centres lie in it,
or, when it holds no patch centre, the patch nearest its centre. Tokens are a square grid of patches
after any prefix (class/register) tokens, which are never pooled. Its classifier is the linear probe's
(`eval.linear_lr`, `eval.linear_weight_decay`) run for `eval.box_linear_epochs` full-batch steps: box
features fit slower than pooled images.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import BOX_CLASSIFICATION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.eval.probes.linear import fit_linear


def roi_features(tokens: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
    """(sum of boxes, D): the mean patch token in each box ([0, 1] xyxy), in the order of the images' boxes."""
    n_tokens = tokens.shape[1]
    side = int(np.sqrt(n_tokens))
    prefix = n_tokens - side * side
    centres = (np.arange(side) + 0.5) / side
    cx, cy = np.meshgrid(centres, centres)  # raster order: row (y) major
    cx, cy = cx.ravel(), cy.ravel()
    out = []
    for img_tokens, img_boxes in zip(tokens, boxes):
        patches = np.asarray(img_tokens[prefix:], np.float32)
        for x1, y1, x2, y2 in img_boxes:
            inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
            if not inside.any():
                inside = np.zeros_like(inside)
                inside[np.argmin((cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2)] = True
            out.append(patches[inside].mean(0))
    return np.stack(out) if out else np.zeros((0, tokens.shape[2]), np.float32)


def box_linear_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """Top1/top5 of every test box, and train top1, of a linear classifier on the boxes' pooled tokens."""
    xtr, xte = roi_features(train.tokens, train.boxes), roi_features(test.tokens, test.boxes)
    ytr, yte = np.concatenate(train.box_labels), np.concatenate(test.box_labels)
    metrics = fit_linear(xtr, ytr, xte, yte, task.num_classes, cfg, epochs=cfg.box_linear_epochs)
    metrics["n_boxes"] = float(len(yte))
    return metrics


BOX_LINEAR = Probe("box_linear", box_linear_probe, kinds=(BOX_CLASSIFICATION,), needs_tokens=True)
