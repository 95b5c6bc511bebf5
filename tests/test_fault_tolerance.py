"""A training worker killed mid-run: Ray Train restarts it from the last checkpoint and the step and
seen-view accounting come out exactly as in an uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest

from pipeline.checkpoints import read_meta
from tests.test_train import BATCH, A, M, micro_config


def ray_train_worker_pids(processes) -> list[int]:
    """PIDs of the Ray Train worker processes among `processes` (psutil.Process objects)."""
    import psutil

    pids = []
    for proc in processes:
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of *this* test session's cluster (descendants of this process)."""
    import psutil

    return ray_train_worker_pids(psutil.Process(os.getpid()).children(recursive=True))


@pytest.mark.timeout(600)
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, digit_shards, tmp_path):
    from pipeline.train.trainer import run_pretrain

    steps = 24
    cfg = micro_config(tmp_path, digit_shards, steps=steps, max_failures=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every_steps=4, log_every_steps=4))
    run_dir = os.path.join(cfg.train.storage_path, cfg.train.run_name)
    killed: list[int] = []

    def killer():
        """Once the step-8 checkpoint exists, SIGKILL the training worker process."""
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if os.path.isdir(os.path.join(run_dir, "checkpoint_00000008")):
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_pretrain(cfg)
    thread.join(timeout=5)
    assert killed, "the worker was never killed: the test did not exercise a failure"
    meta = read_meta(result["checkpoint"])
    assert meta["step"] == steps
    assert meta["views_seen"] == steps * BATCH * (M + A)
