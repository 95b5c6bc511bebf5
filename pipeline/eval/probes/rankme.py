"""RankMe (Garrido et al. 2023): the effective rank of the pooled embeddings, a label-free probe.

A collapsed encoder maps images onto a few directions and gets a low RankMe whatever the task, so
it is reported beside every task's probes as a check that needs no labels and no training. The
train and test rows are pooled together: RankMe is a property of the encoder on that image set.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import TASK_KINDS, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.metrics import rankme


def rankme_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """`rankme` in [1, min(N, D)] and `rankme_fraction` = rankme / min(N, D)."""
    z = np.concatenate([np.asarray(train.pooled, np.float64), np.asarray(test.pooled, np.float64)])
    value = rankme(z)
    return {"rankme": value, "rankme_fraction": value / min(z.shape)}


RANKME = Probe("rankme", rankme_probe, kinds=TASK_KINDS, needs_tokens=False, needs_labels=False)
