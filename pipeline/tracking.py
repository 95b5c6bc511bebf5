"""MLflow tracking. Only the driver creates runs and only rank 0 logs; tracking is best-effort.

Metrics are not the source of truth (checkpoints are): if the tracking server cannot be reached,
training logs a warning and goes on rather than dying mid-run. MLflow's HTTP client retries a dead
server for minutes by default, so a server is probed once (a few seconds) before a client is made,
our clients retry briefly, and a logger that failed rests for a while instead of stalling every step.
"""

from __future__ import annotations

import logging
import os
import re
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
    """Experiment id for `name`, created with a local artifact root next to a sqlite store.

    Two jobs starting at once against one server may both try to create it: the loser reads the
    winner's (the store's unique name constraint decides)."""
    from mlflow.exceptions import MlflowException

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
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        exp = client.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:
            raise
        return exp.experiment_id


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s:]+):([^/@\s]+)@")


def redact(value: Any) -> Any:
    """`scheme://user:password@host` -> `scheme://user:***@host` in strings, dicts and lists.

    Credentials belong in the environment, never in configs; this keeps one pasted into a URI out
    of MLflow params and checkpoint metadata all the same."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\1\2:***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def start_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create a run, log the resolved config as params, return its id."""
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    tags = redact(dict(tags or {}))
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(k, redact(str(v))[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
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

    Outage-safe: metric points are buffered (with their own steps and timestamps) until the server
    takes them, so a tracking server that goes away and comes back costs warnings, not points.
    After a failed call the logger rests (5 s, doubling up to `retry_after_s`) without touching the
    network; calls meanwhile are deferred, not attempted. Whatever cannot be delivered (a buffer
    over `max_buffered` points, artifacts whose files are gone, a server still away at `close`) is
    counted in `unlogged` and reported.
    """

    FIRST_REST_S = 5.0

    def __init__(
        self,
        tracking_uri: str,
        run_id: str | None,
        enabled: bool = True,
        retry_after_s: float = 60.0,
        max_buffered: int = 100_000,
    ):
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self.tracking_uri = tracking_uri
        self.retry_after_s = retry_after_s
        self.max_buffered = max_buffered
        self._client = None
        self._resting_until = 0.0
        self._in_a_row = 0  # consecutive failures: the rest doubles with each
        self._logged_before: dict[str, int] = {}  # metric key -> highest step logged by earlier attempts
        self._pending: list = []  # mlflow Metric points not yet taken by the server
        self._pending_tags: dict[str, str] = {}
        self.failures = 0
        self.deferred = 0  # calls not attempted while resting after a failure
        self.replayed = 0  # metric values not logged because an earlier attempt logged that step
        self.unlogged = 0  # metric points and artifacts that never reached the server
        self.recovered = 0  # buffered points delivered after an outage

    def _call(self, what: str, fn, *args, force: bool = False, **kwargs) -> bool:
        if not self.enabled:
            return False
        if time.monotonic() < self._resting_until and not force:
            self.deferred += 1
            return False
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            fn(self._client, *args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.failures += 1
            self._in_a_row += 1
            rest = min(self.retry_after_s, self.FIRST_REST_S * 2 ** (self._in_a_row - 1))
            self._resting_until = time.monotonic() + rest
            if self.failures <= 3 or self.failures % 100 == 0:
                log.warning(
                    "MLflow %s failed (%d so far), training continues; %d metric points kept for the next try "
                    "in %.0f s: %s",
                    what,
                    self.failures,
                    len(self._pending),
                    rest,
                    exc,
                )
            return False
        if self._in_a_row:
            log.warning("MLflow is back after %d failed calls", self._in_a_row)
        self._in_a_row = 0
        return True

    def _flush(self, client) -> None:
        """Deliver the buffered points (oldest first, 1000 per request) and tags."""
        for key in {m.key for m in self._pending} - set(self._logged_before):
            history = client.get_metric_history(self.run_id, key)
            self._logged_before[key] = max((m.step for m in history), default=-1)
        fresh = [m for m in self._pending if m.step > self._logged_before[m.key]]
        self.replayed += len(self._pending) - len(fresh)
        self._pending = fresh
        while self._pending:
            batch = self._pending[:1000]
            client.log_batch(self.run_id, metrics=batch)  # the store drops exact duplicates of a retried batch
            self._pending = self._pending[len(batch) :]
            if self._in_a_row:
                self.recovered += len(batch)
        if self._pending_tags:
            from mlflow.entities import RunTag

            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._pending_tags.items()])
            self._pending_tags = {}

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), ts, step) for k, v in values.items()]
        overflow = len(self._pending) - self.max_buffered
        if overflow > 0:  # a very long outage: keep the newest points, count the rest
            self.unlogged += overflow
            self._pending = self._pending[overflow:]
        self._call("log_metrics", self._flush)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if (
            not self._call("log_artifact", lambda c: c.log_artifact(self.run_id, local_path, artifact_path))
            and self.enabled
        ):
            self.unlogged += 1  # the file may be gone by the next try (checkpoints are temporary)

    def tags(self, values: dict[str, str]) -> None:
        if not self.enabled:
            return
        self._pending_tags.update({k: str(v) for k, v in redact(values).items()})
        self._call("set_tag", self._flush)

    def close(self) -> int:
        """Last delivery attempt (even while resting); returns and reports the points that never arrived."""
        if self.enabled and (self._pending or self._pending_tags):
            self._call("log_metrics", self._flush, force=True)
        lost = self.unlogged + len(self._pending)
        if lost:
            log.warning(
                "MLflow run %s: %d metric points/artifacts could not be logged (tracking server away)",
                self.run_id,
                lost,
            )
        self.unlogged, self._pending = lost, []
        return lost

    def finish(self, status: str = "FINISHED") -> None:
        self.close()
        self._call("set_terminated", lambda c: c.set_terminated(self.run_id, status), force=True)
