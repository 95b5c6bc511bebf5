"""Box geometry for AB's actions: the one place that maps boxes between frames.

A shared service: the crop stage (data), the action decoder (models) and the objectives all use it.

Boxes are `xyxy` floats. A box "in frame F" has F's top-left at (0, 0) and F's bottom-right at
(1, 1). The action of a (source, target) pair is the target box expressed in the source crop's
frame; the identity action is therefore [0, 0, 1, 1]. Works on numpy arrays and torch tensors
alike (only elementwise arithmetic and stacking on the last axis).
"""

from __future__ import annotations

import numpy as np

IDENTITY_BOX = (0.0, 0.0, 1.0, 1.0)


def _stack(parts, like):
    if isinstance(like, np.ndarray):
        return np.stack(parts, axis=-1)
    import torch

    return torch.stack(parts, dim=-1)


def relative_box(source, target):
    """Target box in the source box's frame: bb_{s->t}. Both inputs share one parent frame.

    Broadcasts over leading axes, so `relative_box(b[:, :, None], b[:, None, :])` gives all
    M x M pairs of a (B, M, 4) box array at once.
    """
    sw = source[..., 2] - source[..., 0]
    sh = source[..., 3] - source[..., 1]
    return _stack(
        [
            (target[..., 0] - source[..., 0]) / sw,
            (target[..., 1] - source[..., 1]) / sh,
            (target[..., 2] - source[..., 0]) / sw,
            (target[..., 3] - source[..., 1]) / sh,
        ],
        target,
    )


def absolute_box(source, relative):
    """Inverse of `relative_box`: map a box given in the source's frame back to the parent frame."""
    sw = source[..., 2] - source[..., 0]
    sh = source[..., 3] - source[..., 1]
    return _stack(
        [
            source[..., 0] + relative[..., 0] * sw,
            source[..., 1] + relative[..., 1] * sh,
            source[..., 0] + relative[..., 2] * sw,
            source[..., 1] + relative[..., 3] * sh,
        ],
        relative,
    )


def compose(a_to_b, b_to_c):
    """Chain two actions: (b in a's frame) then (c in b's frame) gives c in a's frame."""
    return absolute_box(a_to_b, b_to_c)


def box_corners(box):
    """xyxy -> the 4 corners (top-left, top-right, bottom-left, bottom-right) as (..., 4, 2).

    These are the 4 action tokens the decoder reads.
    """
    x0, y0, x1, y1 = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
    xs = [x0, x1, x0, x1]
    ys = [y0, y0, y1, y1]
    if isinstance(box, np.ndarray):
        return np.stack([np.stack([x, y], axis=-1) for x, y in zip(xs, ys)], axis=-2)
    import torch

    return torch.stack([torch.stack([x, y], dim=-1) for x, y in zip(xs, ys)], dim=-2)


def normalise_box(box_px, width: float, height: float):
    """Pixel xyxy in an image of (width, height) -> the image's [0, 1] frame."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.asarray(box_px, dtype=np.float64) / scale


def box_iou(a, b):
    """IoU of xyxy boxes (numpy, broadcasting): used for the crop-distance diagnostics."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def clip_box_px(box_px, width: int, height: int):
    """Clip pixel boxes to the image; returns (clipped, valid) where valid means positive area.

    Boxes that lie (partly) outside the image are clipped; those with no area left are invalid and
    must be skipped and counted by the caller.
    """
    b = np.asarray(box_px, dtype=np.float64).reshape(-1, 4)
    clipped = np.stack(
        [
            np.clip(b[:, 0], 0, width),
            np.clip(b[:, 1], 0, height),
            np.clip(b[:, 2], 0, width),
            np.clip(b[:, 3], 0, height),
        ],
        axis=-1,
    )
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]) & np.isfinite(b).all(axis=1)
    return clipped, valid
