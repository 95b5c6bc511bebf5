"""MLflow tracking. Only the driver creates runs and only rank 0 logs; tracking is best-effort.

Metrics are not the source of truth (checkpoints are): if the tracking server cannot be reached,
training logs a warning and goes on rather than dying mid-run. MLflow's HTTP client retries a dead
server for minutes by default, so a server is probed once (a few seconds) before a client is made,
our clients retry briefly, and a logger that failed rests for a while instead of stalling every step.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("abpipe.tracking")

_MAX_PARAM_LEN = 6000
PROBE_TIMEOUT_S = 3.0
# Short retries for our MLflow clients (MLflow's defaults back off for minutes); user settings win.
_HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer; the message names the URI."""


def probe(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within `timeout` if an http(s) tracking server is unreachable (file/sqlite stores are local).

    Any HTTP answer, even 401/404, means a server is there; only a refused or timed-out connection
    raises `TrackingUnavailable`.
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable ({reason})") from None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    for key, value in _HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    probe(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """Experiment id for `name`, created with a local artifact root next to a sqlite store."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_root is None and tracking_uri.startswith("sqlite:///"):
        artifact_root = os.path.join(os.path.dirname(tracking_uri[len("sqlite:///") :]), "mlartifacts")
    location = None
    if artifact_root:
        os.makedirs(artifact_root, exist_ok=True)
        location = f"file://{os.path.abspath(artifact_root)}"
    return client.create_experiment(name, artifact_location=location)


def start_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create a run, log the resolved config as params, return its id."""
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    if tags:
        client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run.info.run_id


class RunLogger:
    """Rank-0 metric/artifact logger bound to one run; never raises into the training loop.

    Restart-safe: a run resumed from a checkpoint replays the steps after that checkpoint, which an
    earlier attempt may already have logged; a metric is only logged for steps above the highest
    step this run held for it when the logger started, so no step appears twice in MLflow.
    After a failed call the logger rests `retry_after_s` (dropping, and counting, what comes in).
    """

    def __init__(self, tracking_uri: str, run_id: str | None, enabled: bool = True, retry_after_s: float = 60.0):
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self.tracking_uri = tracking_uri
        self.retry_after_s = retry_after_s
        self._client = None
        self._resting_until = 0.0
        self._logged_before: dict[str, int] = {}  # metric key -> highest step logged by earlier attempts
        self.failures = 0
        self.dropped = 0  # calls not attempted while resting after a failure
        self.replayed = 0  # metric values not logged because an earlier attempt logged that step

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        if time.monotonic() < self._resting_until:
            self.dropped += 1
            return
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            fn(self._client, *args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.failures += 1
            self._resting_until = time.monotonic() + self.retry_after_s
            if self.failures <= 3 or self.failures % 100 == 0:
                log.warning(
                    "MLflow %s failed (%d so far), training continues without tracking for %.0f s: %s",
                    what,
                    self.failures,
                    self.retry_after_s,
                    exc,
                )

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)

        def log_new(client) -> None:
            for key in values:
                if key not in self._logged_before:
                    history = client.get_metric_history(self.run_id, key)
                    self._logged_before[key] = max((m.step for m in history), default=-1)
            batch = [Metric(k, float(v), ts, step) for k, v in values.items() if step > self._logged_before[k]]
            self.replayed += len(values) - len(batch)
            if batch:
                client.log_batch(self.run_id, metrics=batch)

        self._call("log_metrics", log_new)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", lambda c: c.log_artifact(self.run_id, local_path, artifact_path))

    def tags(self, values: dict[str, str]) -> None:
        self._call("set_tag", lambda c: [c.set_tag(self.run_id, k, str(v)) for k, v in values.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", lambda c: c.set_terminated(self.run_id, status))
