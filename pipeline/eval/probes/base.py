"""What every probe is: a named callable that says which task kinds it reads and whether it needs tokens.

`Probe.__call__` checks the inputs once, here, so a malformed split (missing tokens, a label outside
the task's classes, a box outside [0, 1]) fails with a message naming the split, the image and the
field, before any training starts, instead of deep inside a torch op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.config import ConfigError, EvalConfig, ProbeConfig
from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION, TASK_KINDS, ProbeSplit, TaskInfo

ALL_KINDS = TASK_KINDS
BOX_KINDS = (BOX_CLASSIFICATION, DETECTION)


class ProbeInputError(ValueError):
    """A split or task a probe cannot use; the message names the probe, split and field."""


@dataclass(frozen=True)
class Probe:
    name: str
    fn: Callable[[ProbeSplit, ProbeSplit, TaskInfo, EvalConfig], dict[str, float]]
    kinds: tuple[str, ...]
    needs_tokens: bool
    needs_labels: bool = True  # False: label-free (RankMe)

    def __call__(self, train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
        check_inputs(self, train, test, task)
        if self.needs_tokens:
            check_probe_config(cfg.probe)
        return self.fn(train, test, task, cfg)


def check_probe_config(pc: ProbeConfig) -> None:
    """Settings of the trained probes that would otherwise fail inside torch with a vaguer message."""
    for key in ("decoder_depth", "width", "heads", "steps", "batch_size", "eval_batch_size", "max_objects"):
        if getattr(pc, key) < 1:
            raise ConfigError(f"eval.probe.{key}: must be >= 1, got {getattr(pc, key)}")
    if pc.width % pc.heads:
        raise ConfigError(f"eval.probe.width={pc.width} must be divisible by eval.probe.heads={pc.heads}")
    if pc.coord_bins < 2:
        raise ConfigError(f"eval.probe.coord_bins: need at least 2 location bins, got {pc.coord_bins}")
    if pc.lr <= 0 or not 0 <= pc.warmup_fraction < 1:
        raise ConfigError(
            f"eval.probe.lr must be > 0 and eval.probe.warmup_fraction in [0, 1), got {pc.lr}, {pc.warmup_fraction}"
        )


def _fail(probe: str, task: TaskInfo, where: str, msg: str) -> None:
    raise ProbeInputError(f"probe '{probe}' on task '{task.name}': {where}: {msg}")


def _check_features(probe: Probe, task: TaskInfo, split: ProbeSplit, name: str) -> None:
    pooled = np.asarray(split.pooled)
    if pooled.ndim != 2 or pooled.shape[0] == 0:
        _fail(probe.name, task, f"{name}.pooled", f"expected a non-empty (N, D) array, got shape {pooled.shape}")
    if not np.isfinite(pooled).all():
        _fail(probe.name, task, f"{name}.pooled", f"{int((~np.isfinite(pooled)).any(axis=1).sum())} rows hold NaN/inf")
    if not probe.needs_tokens:
        return
    if split.tokens is None:
        _fail(
            probe.name,
            task,
            f"{name}.tokens",
            "this probe cross-attends to the encoder's tokens; extract them (tokens=None)",
        )
    tokens = split.tokens
    if tokens.ndim != 3 or tokens.shape[0] != len(split):
        _fail(probe.name, task, f"{name}.tokens", f"expected ({len(split)}, T, D), got shape {tokens.shape}")
    if not np.isfinite(tokens).all():
        _fail(
            probe.name,
            task,
            f"{name}.tokens",
            f"{int((~np.isfinite(tokens)).any(axis=(1, 2)).sum())} images hold NaN/inf",
        )


def _check_labels(probe: Probe, task: TaskInfo, split: ProbeSplit, name: str) -> None:
    if split.labels is None:
        _fail(probe.name, task, f"{name}.labels", "a classification task needs one class id per image (labels=None)")
    labels = np.asarray(split.labels)
    if labels.shape != (len(split),) or not np.issubdtype(labels.dtype, np.integer):
        _fail(
            probe.name,
            task,
            f"{name}.labels",
            f"expected ({len(split)},) integer class ids, got {labels.dtype} {labels.shape}",
        )
    bad = np.flatnonzero((labels < 0) | (labels >= task.num_classes))
    if len(bad):
        _fail(
            probe.name,
            task,
            f"{name}.labels[{bad[0]}]",
            f"class id {labels[bad[0]]} outside [0, {task.num_classes}) ({len(bad)} such images)",
        )


def _check_boxes(probe: Probe, task: TaskInfo, split: ProbeSplit, name: str) -> None:
    if split.boxes is None or split.box_labels is None:
        _fail(probe.name, task, f"{name}.boxes", f"a {task.kind} task needs boxes and box_labels per image")
    if len(split.boxes) != len(split) or len(split.box_labels) != len(split):
        _fail(
            probe.name,
            task,
            f"{name}.boxes",
            f"{len(split.boxes)} box arrays and {len(split.box_labels)} label arrays for {len(split)} images",
        )
    for i, (boxes, labels) in enumerate(zip(split.boxes, split.box_labels)):
        boxes, labels = np.asarray(boxes), np.asarray(labels)
        if boxes.size == 0 and labels.size == 0:
            continue
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            _fail(
                probe.name,
                task,
                f"{name}.boxes[{i}]",
                f"expected (K, 4) boxes and (K,) labels, got {boxes.shape} and {labels.shape}",
            )
        if not np.isfinite(boxes).all() or (boxes < 0).any() or (boxes > 1).any():
            _fail(
                probe.name,
                task,
                f"{name}.boxes[{i}]",
                "coordinates must be finite and in the image's [0, 1] frame (xyxy)",
            )
        flat = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
        if len(flat):
            _fail(
                probe.name,
                task,
                f"{name}.boxes[{i}][{flat[0]}]",
                f"empty box {boxes[flat[0]].tolist()} (need x1 > x0 and y1 > y0)",
            )
        if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any() or (labels >= task.num_classes).any():
            _fail(
                probe.name,
                task,
                f"{name}.box_labels[{i}]",
                f"class ids must be integers in [0, {task.num_classes}), got {labels.tolist()}",
            )


def check_inputs(probe: Probe, train: ProbeSplit, test: ProbeSplit, task: TaskInfo) -> None:
    """Raise ProbeInputError for anything the probe cannot use; return None when all is well."""
    if task.kind not in TASK_KINDS:
        _fail(probe.name, task, "task.kind", f"unknown kind {task.kind!r}; known: {', '.join(TASK_KINDS)}")
    if task.kind not in probe.kinds:
        _fail(probe.name, task, "task.kind", f"this probe handles {', '.join(probe.kinds)}, not {task.kind}")
    if probe.needs_labels and task.num_classes < 2:
        _fail(probe.name, task, "task.class_names", f"need at least 2 classes, got {task.class_names}")
    for name, split in (("train", train), ("test", test)):
        _check_features(probe, task, split, name)
        if not probe.needs_labels:
            continue
        if task.kind == CLASSIFICATION:
            _check_labels(probe, task, split, name)
        else:
            _check_boxes(probe, task, split, name)
    if train.pooled.shape[1] != test.pooled.shape[1]:
        _fail(probe.name, task, "pooled", f"train has {train.pooled.shape[1]} features, test {test.pooled.shape[1]}")
    if probe.needs_tokens and train.tokens.shape[2] != test.tokens.shape[2]:
        _fail(probe.name, task, "tokens", f"train tokens are {train.tokens.shape[2]}-d, test {test.tokens.shape[2]}-d")
    if probe.needs_labels and task.kind in BOX_KINDS and not sum(len(b) for b in train.box_labels):
        _fail(probe.name, task, "train.boxes", "no objects in the training split")
