"""Driver side of pretraining: wire shards -> crop stage -> TorchTrainer, MLflow run, resume.

Resuming is Ray Train V2's way: re-run with the same `train.storage_path` and `train.run_name`;
the loop then starts from the latest checkpoint, and the MLflow run id stored in that checkpoint
makes the resumed job log into the same MLflow run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline import tracking
from pipeline.checkpoints import latest_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.runtime import init_ray
from pipeline.storage import StorageError, check_access, explain, filesystem, join
from pipeline.train.loop import Budget, train_loop_per_worker


def check_cpu_budget(cfg: Config, cluster_cpus: float) -> None:
    """Fail fast where the data stage cannot fit beside the training workers.

    Ray Train leaves the data pipeline `cluster CPUs - training CPUs`; if one crop actor and one
    shard-read task per stream do not fit in that, the stream never starts and the run hangs silently.
    """
    streams = 2 if cfg.data.decoupled else 1
    budget = cluster_cpus - cfg.train.num_workers * cfg.train.cpus_per_worker
    need = streams * (cfg.views.cpus_per_actor + cfg.data.read_cpus)
    if budget + 1e-9 < need:
        message = (
            f"the data stage needs {need:g} CPUs ({streams} stream(s) x (views.cpus_per_actor={cfg.views.cpus_per_actor:g} + "
            f"data.read_cpus={cfg.data.read_cpus:g})) but only {budget:g} of the cluster's {cluster_cpus:g} are left "
            f"after {cfg.train.num_workers} training worker(s) x train.cpus_per_worker={cfg.train.cpus_per_worker:g}; "
            "lower those settings or add CPUs"
        )
        if cfg.ray.address:  # an autoscaling cluster may still grow: warn instead of refusing
            print(f"[abpipe] WARNING: {message}", flush=True)
        else:
            raise ConfigError(message)


def build_training_datasets(cfg: Config, cluster_cpus: float) -> dict:
    """Shards -> multi-view crops, as lazy streaming Ray Datasets: {"train"} or, decoupled,
    {"train": propagation crops, "annotations": annotation views}."""
    import dataclasses

    import ray.data

    from pipeline.data.crop_stage import build_crop_dataset, crop_pool_size
    from pipeline.data.mixing import default_read_concurrency, passes_needed, stream_dataset, stream_size

    # The one-line-per-interval training log is the progress display here; Ray Data's bars from
    # the split coordinator would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    images_needed = (
        Budget.from_config(cfg, cfg.train.num_workers).total_steps * cfg.train.batch_size * cfg.train.num_workers
    )

    def stream(shards: str, mixture: dict[str, float], views, seed: int):
        passes = passes_needed(images_needed, stream_size(shards, mixture), cfg.data.max_passes_per_execution)
        readers = (
            default_read_concurrency(crop_pool_size(views))
            if cfg.data.read_concurrency is None
            else cfg.data.read_concurrency
        )
        return stream_dataset(shards, mixture, cfg.data.read_cpus, passes, readers, seed)

    name = f"crop-stats-{cfg.train.run_name}"
    if not cfg.data.decoupled:
        crops = stream(cfg.data.shards, cfg.data.mixture, cfg.views, cfg.train.seed)
        return {"train": build_crop_dataset(crops, cfg.views, seed=cfg.train.seed, stats_name=name)}
    # Two actor pools share what training leaves; each gets a fixed half so neither can take all
    # CPUs and starve the other (the trainer needs a batch from both every step).
    free = cluster_cpus - cfg.train.num_workers * cfg.train.cpus_per_worker - 2 * cfg.data.read_cpus
    per_stream = (
        max(1, int(free / 2 / cfg.views.cpus_per_actor)) if cfg.views.concurrency is None else cfg.views.concurrency
    )
    crop_views = dataclasses.replace(cfg.views, annotation_views=0, concurrency=per_stream)
    ann_views = dataclasses.replace(cfg.views, num_views=0, concurrency=per_stream)
    crops = stream(cfg.data.shards, cfg.data.mixture, crop_views, cfg.train.seed)
    anns = stream(cfg.data.annotation_shards, cfg.data.annotation_mixture, ann_views, cfg.train.seed + 1)
    return {
        "train": build_crop_dataset(crops, crop_views, seed=cfg.train.seed, stats_name=name),
        "annotations": build_crop_dataset(anns, ann_views, seed=cfg.train.seed + 1, stats_name=f"{name}-annotations"),
    }


def run_pretrain(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining; returns run id, final checkpoint path and last metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = cfg.resolved()
    storage = cfg.train.storage_path
    os.makedirs(storage, exist_ok=True) if "://" not in storage else None
    check_access(storage, write=True)  # one clear line for bad credentials or a missing bucket
    check_access(cfg.data.shards, write=False) if not cfg.data.mixture else None
    init_ray(cfg.ray)
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    check_cpu_budget(cfg, cluster_cpus)

    try:
        found = latest_checkpoint(storage, cfg.train.run_name)
    except OSError as exc:
        raise explain(exc, storage, "looking for checkpoints to resume from") or exc from None
    previous, run_id = (found[0], found[1].get("mlflow_run_id")) if found else (None, None)
    if previous:
        print(f"[abpipe] resuming run '{cfg.train.run_name}' from {previous}", flush=True)
    init = None  # MAWS stage: resolve train.init_from once here (a resumed run has its own weights)
    if cfg.train.init_from and not previous:
        from pipeline.train.init_from import resolve_init_source

        init = resolve_init_source(
            cfg.train.init_from, cfg.tracking.tracking_uri, cfg.paths.under("init_from", cfg.train.run_name)
        )
    if not run_id:
        run_id = _start_mlflow_run(cfg, init.tags(cfg.train.init_from) if init else None)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "init_from_dir": init.directory if init else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            **_storage_kwargs(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=build_training_datasets(cfg, cluster_cpus),
    )
    started = time.perf_counter()
    logger = tracking.RunLogger(cfg.tracking.tracking_uri, run_id)
    try:
        result = trainer.fit()
    except Exception as exc:
        logger.finish("FAILED")
        error = explain(exc, storage, "training")
        if error is not None:  # storage lost mid-run: one line; resubmitting resumes from the last checkpoint
            raise StorageError(f"{error}; resubmit the same job to resume") from None
        raise
    checkpoint_path = (
        join(storage, cfg.train.run_name, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    )
    failed, unlogged = (int(result.metrics.get(k, 0) or 0) for k in ("mlflow_failed_calls", "mlflow_unlogged_points"))
    if failed:  # the gap, counted and reported: late points arrived, lost ones are named by number
        print(f"[abpipe] WARNING: the MLflow tracking server was away during training ({failed} failed calls); "
              f"{unlogged} metric points/artifacts never reached it", flush=True)  # fmt: skip
        logger.metrics(
            {"mlflow_failed_calls": failed, "mlflow_unlogged_points": unlogged}, int(result.metrics.get("step", 0))
        )
    logger.tags({"abpipe.checkpoint_path": checkpoint_path or "", "abpipe.storage_path": storage})
    logger.metrics({"wall_time_s": time.perf_counter() - started}, int(result.metrics.get("step", 0)))
    logger.finish()
    return {"run_id": run_id, "checkpoint": checkpoint_path, "metrics": dict(result.metrics)}


def _storage_kwargs(storage: str) -> dict[str, Any]:
    """RunConfig storage: a URI goes through the same filesystem as shards (endpoint and credentials
    from the environment), handed to Ray Train as `storage_filesystem`."""
    if "://" not in storage:
        return {"storage_path": storage}
    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def _start_mlflow_run(cfg: Config, extra_tags: dict[str, str] | None = None) -> str | None:
    try:
        return tracking.start_run(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            cfg.train.run_name,
            cfg.flat(),
            tags={
                "abpipe.kind": "pretrain",
                "abpipe.objective": cfg.objective.name,
                "abpipe.shards": ",".join(cfg.data.mixture) or cfg.data.shards,
                "abpipe.annotation_shards": ",".join(cfg.data.annotation_mixture)
                or cfg.data.annotation_shards
                or "(same as shards)",
                **(extra_tags or {}),  # lineage of a staged (MAWS) run: parent run, checkpoint sha256
            },
        )
    except Exception as exc:  # tracking is best-effort; checkpoints are the source of truth
        print(f"[abpipe] WARNING: MLflow unavailable ({exc}); training without tracking", flush=True)
        return None
