"""Process-level set-up shared by every job: quiet, local-by-default Ray and a sane environment."""

from __future__ import annotations

import os

from pipeline.config import RayConfig

# Keep a local cluster on loopback, off usage telemetry, and libraries offline.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def quiet_environment() -> None:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(cfg: RayConfig | None = None):
    """Connect to `cfg.address`, or start a local instance bound to 127.0.0.1 (idempotent)."""
    quiet_environment()
    import ray

    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    env_vars = {k: os.environ[k] for k in _QUIET_ENV if k in os.environ}
    kwargs = dict(
        ignore_reinit_error=True,
        log_to_driver=True,
        runtime_env={"env_vars": env_vars},
        configure_logging=True,
        logging_level="WARNING",
    )
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            _temp_dir=cfg.temp_dir or os.environ.get("ABPIPE_RAY_TMP", "/tmp/abpipe-ray"),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    return ray
