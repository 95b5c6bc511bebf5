"""Frozen-feature probes. Each is `fn(train_x, train_y, test_x, test_y, cfg: EvalConfig) -> metrics`.

Labels may be any hashable values (strings are fine); metric keys are un-prefixed (`top1`), the eval
job prefixes them with the probe name (`knn_top1`). A new probe (decoder, attentive) is one entry.
"""

from __future__ import annotations

from pipeline.eval.probes.knn import knn_probe
from pipeline.eval.probes.linear import linear_probe

PROBES = {"knn": knn_probe, "linear": linear_probe}

__all__ = ["PROBES", "knn_probe", "linear_probe"]
