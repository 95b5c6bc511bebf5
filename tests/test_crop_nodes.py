"""Crop actors on CPU-only nodes: on a real 3-node local Ray cluster (head without CPUs, a "crop"
node carrying `crop_node` and a label, a "train" node carrying `train_node`), a pretraining run with
`views.resources={crop_node: ...}` and `train.resources_per_worker={train_node: 1}` puts every crop
actor on the crop node and the training worker on the train node; `views.label_selector` does the
same by node label. Where each actor ran is read from Ray's state API (tests/crop_nodes_job.py,
in its own process: a driver holds one Ray connection, and the session's shared instance stays up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_crop_actors_run_only_on_the_crop_node(digit_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # "0" (local-only) would keep nodes from joining
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.crop_nodes_job", str(digit_shards), str(tmp_path / "root")],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    crop, train = result["crop_node"], result["train_node"]
    assert result["step"] == 4 and result["pool_size"] == 2, (
        "2 crop CPUs, 1 per actor: the pool is sized by the crop node"
    )
    assert result["crop_actor_nodes"] and set(result["crop_actor_nodes"]) == {crop}, result["actors"]
    assert result["train_worker_nodes"] and set(result["train_worker_nodes"]) == {train}, result["actors"]
    assert len(result["label_actor_nodes"]) > len(result["crop_actor_nodes"]) and set(result["label_actor_nodes"]) == {
        crop
    }
    assert result["label_rows"] == 4
