"""What a probe sees: frozen features of one split plus the task's targets, in one shape for all probes.

Tasks (pipeline/eval/tasks.py) say *what* to predict; probes (pipeline/eval/probes/) say *how* to read
it out of frozen features. This module is the contract between them, so either side can grow
without the other changing:

- `pooled` feeds the linear probe and kNN; `tokens` (the encoder's final tokens) feed the decoder
  and attentive probes, which cross-attend to them (Beyer et al. 2023; AB paper appendix A.1).
- Boxes are xyxy in the image's [0, 1] frame (the frame the probe's location tokens quantise), so a
  probe never needs the image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSIFICATION = "classification"  # one label per image (also counting / distance as classes)
BOX_CLASSIFICATION = "box_classification"  # 4 location tokens in -> class out, one query per box
DETECTION = "detection"  # image -> set of (box, class)
TASK_KINDS = (CLASSIFICATION, BOX_CLASSIFICATION, DETECTION)


@dataclass
class TaskInfo:
    name: str
    kind: str  # one of TASK_KINDS
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class ProbeSplit:
    """Features and targets of one split; row i of every array is the same image."""

    pooled: np.ndarray  # (N, D) float32
    tokens: np.ndarray | None = None  # (N, T, D) float16/float32, None when no probe needs them
    labels: np.ndarray | None = None  # (N,) int64 class ids, CLASSIFICATION
    boxes: list[np.ndarray] | None = None  # per image (K_i, 4) float32 xyxy in [0, 1]; BOX_CLASSIFICATION / DETECTION
    box_labels: list[np.ndarray] | None = None  # per image (K_i,) int64 class ids

    def __len__(self) -> int:
        return int(self.pooled.shape[0])
