"""MLflow tracking. Only the driver creates runs and only rank 0 logs; tracking is best-effort.

Metrics are not the source of truth (checkpoints are): if the tracking server cannot be reached,
training logs a warning and goes on rather than dying mid-run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("abpipe.tracking")

_MAX_PARAM_LEN = 6000


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

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


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
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
    """Rank-0 metric/artifact logger bound to one run; never raises into the training loop."""

    def __init__(self, tracking_uri: str, run_id: str | None, enabled: bool = True):
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self.tracking_uri = tracking_uri
        self._client = None
        self.failures = 0

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            fn(self._client, *args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.failures += 1
            if self.failures <= 3 or self.failures % 100 == 0:
                log.warning("MLflow %s failed (%d so far), training continues: %s", what, self.failures, exc)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
        self._call("log_metrics", lambda c: c.log_batch(self.run_id, metrics=batch))

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", lambda c: c.log_artifact(self.run_id, local_path, artifact_path))

    def tags(self, values: dict[str, str]) -> None:
        self._call("set_tag", lambda c: [c.set_tag(self.run_id, k, str(v)) for k, v in values.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", lambda c: c.set_terminated(self.run_id, status))
