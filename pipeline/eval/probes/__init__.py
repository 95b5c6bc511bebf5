"""Frozen-feature probes, by name. Each `PROBES[name]` is a `Probe` (pipeline.eval.probes.base):

    PROBES[name](train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> {metric: value}

with attributes `kinds` (the task kinds it reads) and `needs_tokens` (whether the splits must carry
the encoder's final tokens). Metric keys are un-prefixed (`top1`, `map`); the eval job prefixes them.
Inputs are checked before any work (`ProbeInputError` names the split, image and field).

Two entries are not feature probes but readouts of the checkpoint's image and text towers
(MODEL_READOUTS: `zero_shot`, `retrieval`, pipeline/eval/zero_shot.py). They are registered here so
that `eval.probes` names them, task kinds select them and sweeps keep their metrics like any probe's;
the eval job runs them on the model itself, and calling them on features raises.
"""

from __future__ import annotations

from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION
from pipeline.eval.probes.attentive import ATTENTIVE
from pipeline.eval.probes.base import Probe, ProbeInputError
from pipeline.eval.probes.box_linear import BOX_LINEAR
from pipeline.eval.probes.decoder import DECODER
from pipeline.eval.probes.knn import KNN, knn_predict
from pipeline.eval.probes.linear import LINEAR
from pipeline.eval.probes.rankme import RANKME
from pipeline.eval.task_formats.captions import CAPTIONS


def _reads_the_model(train, test, task, cfg) -> dict[str, float]:
    raise ProbeInputError(
        f"task '{task.name}': zero_shot and retrieval read the checkpoint's image and text towers, not frozen "
        "features; the eval job runs them (pipeline.eval.zero_shot.run_readout)"
    )


ZERO_SHOT = Probe("zero_shot", _reads_the_model, kinds=(CLASSIFICATION, BOX_CLASSIFICATION), needs_tokens=False)
RETRIEVAL = Probe("retrieval", _reads_the_model, kinds=(CAPTIONS,), needs_tokens=False, needs_labels=False)
MODEL_READOUTS = (ZERO_SHOT.name, RETRIEVAL.name)

PROBES: dict[str, Probe] = {
    p.name: p for p in (KNN, LINEAR, BOX_LINEAR, ATTENTIVE, DECODER, RANKME, ZERO_SHOT, RETRIEVAL)
}

__all__ = ["MODEL_READOUTS", "PROBES", "Probe", "ProbeInputError", "knn_predict"]
