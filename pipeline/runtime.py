"""Process-level set-up shared by every job: quiet, local-by-default Ray and a sane environment.

Security defaults: a local instance listens on 127.0.0.1 only, its dashboard (off unless
`ray.dashboard=true`) too. Ray's token auth is on by default for a `ray.init()` instance (the token
lives in ~/.ray/auth_token); a cluster started with `ray start` needs `RAY_AUTH_MODE=token` and the
same token (`RAY_AUTH_TOKEN` or the file) on every node and every client, see cluster/README.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from pipeline import console
from pipeline.config import ConfigError, RayConfig

# Keep Ray off usage telemetry and libraries offline. The one list: the CLI, the tests (tests/conftest.py)
# and Ray workers (passed on by init_ray) all take it from here.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train (2.60) routes a worker's print() to its logger *and*, because Ray wraps every
    # worker's sys.stdout, tees it to stdout too: each line reached the console twice. Off, a
    # print is written once (worker-*.out); abpipe's worker lines use logging (Train's log files).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


# Only for a local instance: Ray then treats the machine as single-node and keeps every address on
# loopback. Never for a cluster: it forbids joining nodes and makes workers report 127.0.0.1, which
# breaks multi-node DDP rendezvous. A local instance has no node that a cloud or an autoscaler can
# drain, so Ray Train's preemption watcher (one more actor process, importing Ray Train, for every
# run) has nothing to watch there; on a cluster it stays on. Ray Train's controller polls its workers
# every 2 s by default, and each poll is a step of its state machine: a run's end (and a restart after a
# lost worker) waits for the next one. Locally a poll is one call to a process on the same machine, so it
# polls every 0.5 s there (a 6-step test run ended 1.1 s after its last report instead of 5.2 s).
LOCAL_ONLY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def init_ray(cfg: RayConfig | None = None):
    """Connect to `cfg.address`, or start a local instance bound to 127.0.0.1 (idempotent).

    Quiet unless `--verbose`: Ray's worker output stays in its log files (log_to_driver off),
    the driver's Ray loggers print errors only, and the log folder is named once.
    """
    quiet_environment()
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    passed_on = dict(QUIET_ENV)
    if not address:
        for key, value in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(key, value)
        passed_on.update(LOCAL_ONLY_ENV)
    import ray

    if ray.is_initialized():
        return ray
    if address:
        check_reachable(address)
    job_env = _submitted_job_env_keys()
    env_vars = {k: os.environ[k] for k in passed_on if k in os.environ and k not in job_env}
    loud = console.verbose()
    kwargs = dict(
        ignore_reinit_error=True,
        log_to_driver=loud,
        runtime_env={"env_vars": env_vars},
        configure_logging=True,
        logging_level="INFO" if loud else "ERROR",
    )
    temp_dir = cfg.temp_dir or os.environ.get("ABPIPE_RAY_TMP", "/tmp/abpipe-ray")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            warn_if_exposed(cfg.dashboard_host if cfg.dashboard else "127.0.0.1")
            ray.init(
                num_cpus=cfg.num_cpus,
                _temp_dir=temp_dir,
                include_dashboard=cfg.dashboard,
                dashboard_host=cfg.dashboard_host,
                _node_ip_address="127.0.0.1",
                **kwargs,
            )
    except Exception as exc:  # ConnectionError (no cluster), a bare Exception (start-up timed out), ...
        what = (
            f"could not connect to {address}"
            if address
            else f"did not start (its logs: {temp_dir}/session_latest/logs)"
        )
        raise RayStartError(f"Ray {what}: {type(exc).__name__}: {exc}") from exc
    quiet_ray_data(loud)
    where = ray_logs_dir()
    if where:
        console.note(f"Ray's logs: {where}" + (" (on the cluster's nodes)" if address else ""))
    else:  # Ray Client: the logs are on the cluster
        console.note("Ray's logs: on the cluster, see `ray logs`")
    return ray


class RayStartError(RuntimeError):
    """`ray.init` failed: no cluster at the address, or a local instance that did not come up."""


def quiet_ray_data(loud: bool) -> None:
    """Ray Data on the driver: no bars of its own (abpipe draws them), and its INFO lines (execution
    plans, "progress disabled") to its ray-data.log only, unless verbose."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.INFO if loud else logging.ERROR)


def ray_logs_dir() -> str | None:
    """This session's log folder (the head node's, for a cluster), or None when unknown (Ray Client)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:
        return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, where `ray.init` would retry an unreachable one for minutes."""
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"ray.address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one (`ray start --head`) or fix ray.address / RAY_ADDRESS"
        ) from None


def _submitted_job_env_keys() -> set[str]:
    """Env vars the `ray job submit --runtime-env` of this driver already sets.

    Ray refuses a driver whose `ray.init(runtime_env=...)` repeats a key of the job's runtime_env,
    so those keys are left to the job (its values are in this process's environment anyway).
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
        return set((runtime_env.get("env_vars") or {}).keys())
    except (ValueError, AttributeError):
        return set()


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def warn_if_exposed(host: str) -> None:
    """The dashboard/job server runs code for whoever reaches it: say so when it leaves loopback."""
    if is_loopback(host):
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        console.warn(
            f"the Ray dashboard/job server binds {host} with RAY_AUTH_MODE=disabled: "
            "anyone who can reach it can run code on this machine. Use ray.dashboard_host=127.0.0.1 "
            "or token auth (RAY_AUTH_MODE=token)."
        )
