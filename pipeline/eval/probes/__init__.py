"""Frozen-feature probes, by name. Each `PROBES[name]` is a `Probe` (pipeline.eval.probes.base):

    PROBES[name](train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> {metric: value}

with attributes `kinds` (the task kinds it reads) and `needs_tokens` (whether the splits must carry
the encoder's final tokens). Metric keys are un-prefixed (`top1`, `map`); the eval job prefixes them.
Inputs are checked before any work (`ProbeInputError` names the split, image and field).
"""

from __future__ import annotations

from pipeline.eval.probes.attentive import ATTENTIVE
from pipeline.eval.probes.base import Probe, ProbeInputError
from pipeline.eval.probes.box_linear import BOX_LINEAR
from pipeline.eval.probes.decoder import DECODER
from pipeline.eval.probes.knn import KNN, knn_predict
from pipeline.eval.probes.linear import LINEAR
from pipeline.eval.probes.rankme import RANKME

PROBES: dict[str, Probe] = {p.name: p for p in (KNN, LINEAR, BOX_LINEAR, ATTENTIVE, DECODER, RANKME)}

__all__ = ["PROBES", "Probe", "ProbeInputError", "knn_predict"]
