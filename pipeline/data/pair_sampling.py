"""The crop-distance control of the AB paper's Fig. 3: source/target crops closer or further apart
(by IoU) while the marginal distribution of each crop box stays exactly the Inception-style one.

How the marginal is kept: draw a pool of k*M boxes i.i.d. from the usual distribution, partition the
pool into k groups of exactly M boxes by a rule that makes boxes within a group overlap a lot
("near") or little ("far"), and keep one group chosen uniformly at random. Picking a uniform group
and then a uniform member of it (all groups have M members) is the same as picking a uniform member
of the pool, so a crop's box has the unconditional distribution; only the *joint* distribution of
the M boxes, hence of the M^2 (source, target) pairs, changes.
"""

from __future__ import annotations

import numpy as np

from pipeline.geometry import box_iou

MODES = ("iid", "near", "far")


def partition_by_iou(
    pool: np.ndarray, m: int, mode: str, rng: np.random.Generator, passes: int = 3
) -> list[np.ndarray]:
    """Split `pool` (k*M, 4) into k index groups of M: a random partition, then pairwise swaps
    between groups that raise ("near") or lower ("far") the total within-group IoU (local search)."""
    n = len(pool)
    if n % m:
        raise ValueError(f"pool of {n} boxes cannot be split into groups of {m}")
    iou = box_iou(pool[:, None, :], pool[None, :, :])
    sign = 1.0 if mode == "near" else -1.0
    groups = [list(g) for g in rng.permutation(n).reshape(n // m, m)]
    for _ in range(passes):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                for i in range(m):
                    for j in range(m):
                        x, y = groups[a][i], groups[b][j]
                        rest_a = [t for t in groups[a] if t != x]
                        rest_b = [t for t in groups[b] if t != y]
                        gain = iou[y, rest_a].sum() + iou[x, rest_b].sum() - iou[x, rest_a].sum() - iou[y, rest_b].sum()
                        if sign * gain > 1e-12:
                            groups[a][i], groups[b][j] = y, x
                            improved = True
        if not improved:
            break
    return [np.array(g) for g in groups]


def select_boxes(pool: np.ndarray, m: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """M boxes out of a pool of k*M i.i.d. boxes: the first M for "iid", else one random IoU group."""
    if mode not in MODES:
        raise ValueError(f"views.pair_sampling must be one of {MODES}, got {mode!r}")
    if mode == "iid" or len(pool) == m:
        return pool[:m]
    groups = partition_by_iou(pool, m, mode, rng)
    return pool[groups[int(rng.integers(len(groups)))]]


def mean_pair_iou(boxes: np.ndarray) -> float:
    """Mean IoU over the M*(M-1) ordered pairs of distinct crops of one image."""
    m = len(boxes)
    iou = box_iou(boxes[:, None, :], boxes[None, :, :])
    return float((iou.sum() - np.trace(iou)) / max(m * (m - 1), 1))
