"""A real 2-node Ray cluster on 127.0.0.1, started with the `ray` CLI as a user would (token auth on,
dashboard on loopback), and a pretraining job submitted to it with `ray job submit --runtime-env`.

A training worker is SIGKILLed mid-run: `FailureConfig(max_failures)` restarts the worker group from
the last checkpoint, and the final step, the seen-view count and the MLflow metric history come out
exactly as in an uninterrupted run (no lost or repeated steps).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.checkpoints import latest_checkpoint_dir, read_meta
from tests.micro import MICRO_MODEL
from tests.test_resume import ray_train_worker_pids

pytestmark = pytest.mark.ray  # starts its own two-node Ray cluster with `ray start`

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
BATCH, M, A, WORKERS = 8, 3, 2, 2
VIEWS_PER_STEP = BATCH * (M + A) * WORKERS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Explicit free ports, so this cluster never collides with another Ray instance on the machine."""
    args = []
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ):
        args += [flag, str(_free_port())]
    return args


class TwoNodeCluster:
    """A head node (1 CPU, dashboard/job server on 127.0.0.1) and a worker node (2 CPUs), as processes."""

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
        self.tmp = Path(tempfile.mkdtemp(prefix="abpipe-mn-", dir="/tmp"))
        (self.tmp / "home").mkdir()
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            "HOME": str(self.tmp / "home"),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # "0" would forbid joining a worker node
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], log_name: str) -> None:
        log = open(self.tmp / log_name, "w")
        self.nodes.append(
            subprocess.Popen(
                [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *args, *_node_ports()],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def start(self) -> None:
        self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--num-cpus",
                "1",
                "--object-store-memory",
                str(100 << 20),
                "--temp-dir",
                str(self.tmp / "ray"),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(_free_port()),
                "--disable-usage-stats",
            ],
            "head.log",
        )
        self.wait_for_nodes(1)
        self._start(
            ["--address", self.address, "--num-cpus", "2", "--object-store-memory", str(100 << 20)], "worker.log"
        )
        self.wait_for_nodes(2)

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline, out = time.time() + timeout, ""
        while time.time() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {node.returncode}: {self.logs()}")
            r = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True, text=True)
            out = r.stdout + r.stderr
            if r.returncode == 0 and len(re.findall(r"^\s*1 node_", r.stdout, re.M)) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout} s: {out[-2000:]}")

    def processes(self) -> list[psutil.Process]:
        procs = []
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def train_worker_pids(self) -> list[int]:
        return ray_train_worker_pids(self.processes())

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        """Stop only this cluster's processes (never `ray stop`: it would kill every Ray on the machine)."""
        procs = self.processes()
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        # what has not exited 5 s after SIGTERM is killed (the teardown took 22 s waiting 20 s for stragglers)
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def two_node_cluster(request):
    cluster = TwoNodeCluster()
    request.addfinalizer(cluster.stop)
    cluster.start()
    return cluster


def _micro_config_file(path: Path, root: Path, shards: Path, steps: int) -> Path:
    config = {
        "paths": {"root": str(root)},
        "data": {"shards": str(shards), "shuffle_buffer": 16},
        "views": {
            "num_views": M,
            "view_size": 32,
            "annotation_views": A,
            "batch_size": 16,
            "concurrency": 1,
            "cpus_per_actor": 0.5,
        },
        "model": json.loads(json.dumps(MICRO_MODEL.__dict__)),
        "train": {
            "total_views": steps * VIEWS_PER_STEP,
            "batch_size": BATCH,
            "num_workers": WORKERS,
            "cpus_per_worker": 0.5,
            "checkpoint_every_steps": 4,
            "log_every_steps": 1,
            "max_failures": 2,
            "run_name": "multinode",
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(600)
def test_job_on_two_node_cluster_survives_a_killed_worker(two_node_cluster, digit_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    cluster, steps = two_node_cluster, 40
    # The job server binds loopback only and refuses a request without the cluster's token.
    listening = {
        c.laddr.ip
        for p in cluster.processes()
        for c in _connections(p)
        if c.status == psutil.CONN_LISTEN and c.laddr.port == cluster.dashboard_port
    }
    assert listening == {"127.0.0.1"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    root = tmp_path / "root"
    config = _micro_config_file(tmp_path / "micro.yaml", root, digit_shards, steps)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = tmp_path / "runtime_env.yaml"  # the tracking server reaches the job as an env var, not a config value
    runtime_env.write_text(
        yaml.safe_dump(
            {
                "env_vars": {
                    "MLFLOW_TRACKING_URI": tracking_uri,
                    "NO_ALBUMENTATIONS_UPDATE": "1",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                }
            }
        )
    )
    run_dir = root / "ray_results" / "multinode"
    killed: list[int] = []

    def committed_step() -> int:
        """The step of the newest checkpoint Ray Train's controller has registered (what a restart resumes
        from); a checkpoint directory alone is not enough: its report may still be in flight."""
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[-1])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def killer() -> None:
        """SIGKILL one training worker of this cluster as soon as the step-8 checkpoint is committed.

        The workers are looked up at the first checkpoint already: at full speed the run needs only
        seconds from step 8 to its end, so the kill itself must not wait for a process scan.
        """
        deadline, pids = time.time() + 400, []
        while time.time() < deadline and not killed:
            if not pids and (run_dir / "checkpoint_00000004").is_dir():
                pids = cluster.train_worker_pids()
            if pids and committed_step() >= 8:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(committed_step())
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--runtime-env",
            str(runtime_env),
            "--log-color",
            "false",
            "--",
            sys.executable,
            str(REPO / "jobs" / "pretrain.py"),
            "--config",
            str(config),
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    thread.join(timeout=5)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, f"job failed:\n{output[-6000:]}\n{cluster.logs()}"
    assert killed, "no training worker was killed: the test did not exercise a failure"

    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", output)]
    assert resumed and all(killed[0] <= s < steps and s % 4 == 0 for s in resumed), output[-4000:]
    final = read_meta(latest_checkpoint_dir(str(root / "ray_results"), "multinode"))
    assert final["step"] == steps and final["world_size"] == WORKERS
    assert final["views_seen"] == steps * VIEWS_PER_STEP

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("abpipe").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == final["mlflow_run_id"]
    history = client.get_metric_history(run.info.run_id, "views_seen")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "a step is missing or logged twice"
    assert all(m.value == m.step * VIEWS_PER_STEP for m in history)


def _connections(proc: psutil.Process):
    try:
        return proc.net_connections(kind="inet")
    except psutil.Error:
        return []
