"""MLflow is best-effort: an unreachable server costs seconds and a warning, never the run; a run
restarted from a checkpoint does not log the replayed steps twice."""

from __future__ import annotations

import dataclasses
import http.server
import logging
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.checkpoints import read_meta
from tests.test_train import BATCH, A, M, micro_config


@pytest.fixture
def closed_port_uri() -> str:
    """An http URI on 127.0.0.1 where nothing listens (the port was just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def http_404_server():
    """A real HTTP server that answers 404 to everything: a server *is* there."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_unreachable_server_fails_fast_and_names_the_uri(closed_port_uri, http_404_server):
    started = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailable, match=closed_port_uri):
        tracking.start_run(closed_port_uri, "abpipe", "r", {"a": 1})
    assert time.perf_counter() - started < tracking.PROBE_TIMEOUT_S + 5  # MLflow's own retries take minutes
    tracking.probe(http_404_server)  # any HTTP answer counts as reachable
    tracking.probe("sqlite:////nonexistent/x.db")  # local stores are not probed


def test_logger_warns_once_then_rests_instead_of_stalling_each_step(closed_port_uri, caplog):
    logger = tracking.RunLogger(closed_port_uri, run_id="0123456789abcdef", retry_after_s=60)
    with caplog.at_level(logging.WARNING, logger="abpipe.tracking"):
        logger.metrics({"loss": 1.0}, step=1)
        started = time.perf_counter()
        for step in range(2, 12):
            logger.metrics({"loss": 1.0}, step=step)
        resting = time.perf_counter() - started
    assert logger.failures == 1 and logger.deferred == 10
    assert resting < 0.5, "calls while resting must not touch the network"
    assert [r for r in caplog.records if "training continues" in r.getMessage()], "no warning was logged"


def test_restarted_logger_skips_steps_an_earlier_attempt_logged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "unit", "replay", {})
    first = tracking.RunLogger(uri, run_id)
    for step in range(1, 6):  # the attempt that dies after logging step 5 (last checkpoint: step 2)
        first.metrics({"loss": 10.0 + step, "views_seen": step * 40}, step)
    second = tracking.RunLogger(uri, run_id)
    for step in range(3, 8):  # the restarted attempt replays steps 3..5, then goes on
        second.metrics({"loss": 20.0 + step, "views_seen": step * 40}, step)
    second.metrics({"bad_steps": 1}, 7)
    second.metrics({"bad_steps": 2}, 7)  # several skipped steps at one step within an attempt all count

    client = MlflowClient(uri)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(loss) == [1, 2, 3, 4, 5, 6, 7]
    assert [loss[s] for s in range(1, 8)] == [11, 12, 13, 14, 15, 26, 27]
    assert len(client.get_metric_history(run_id, "views_seen")) == 7
    assert second.replayed == 3 * 2
    assert [m.value for m in client.get_metric_history(run_id, "bad_steps")] == [1, 2]


def test_training_finishes_with_a_warning_when_mlflow_is_unreachable(
    ray_cluster, digit_shards, tmp_path, closed_port_uri, capsys
):
    """The loop in the driver (train.num_workers=0): the warning and the fallback are the driver's either way;
    a tracking outage on Ray Train's worker is test_production's."""
    from pipeline.train.trainer import run_pretrain

    steps = 3
    cfg = micro_config(tmp_path, digit_shards, steps=steps, num_workers=0)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=closed_port_uri))
    result = run_pretrain(cfg)
    out = capsys.readouterr().out
    assert "WARNING: MLflow unavailable" in out and closed_port_uri in out
    assert result["run_id"] is None
    meta = read_meta(result["checkpoint"])  # checkpoints, the source of truth, are all there
    assert meta["step"] == steps and meta["views_seen"] == steps * BATCH * (M + A)


def test_a_password_in_a_uri_is_masked_in_params_and_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    secret_uri = "postgresql://mlflow:hunter2@db.internal:5432/mlflow"
    assert tracking.redact({"a": [secret_uri, "s3://bucket/x"], "n": 3}) == {
        "a": ["postgresql://mlflow:***@db.internal:5432/mlflow", "s3://bucket/x"],
        "n": 3,
    }
    run_id = tracking.start_run(
        uri, "unit", "masked", {"tracking.tracking_uri": secret_uri}, {"abpipe.output": "s3://AKIAKEY:sk@bucket/x"}
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["tracking.tracking_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert run.data.tags["abpipe.output"] == "s3://AKIAKEY:***@bucket/x" and "hunter2" not in str(run.data)
