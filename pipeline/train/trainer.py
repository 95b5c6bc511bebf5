"""Driver side of pretraining: wire shards -> crop stage -> TorchTrainer, MLflow run, resume.

Resuming is Ray Train V2's way: re-run with the same `train.storage_path` and `train.run_name`;
the loop then starts from the latest checkpoint. The MLflow run is chosen once: the driver that
creates it writes its id into the run's record (`<storage>/<run name>/abpipe_run.json`), and a
re-submitted job reads it from there, so a resumed run logs into the same MLflow run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline import console, tracking
from pipeline.checkpoints import latest_checkpoint, read_run_record, write_run_record
from pipeline.config import Config, ConfigError
from pipeline.runtime import init_ray
from pipeline.storage import StorageError, check_access, explain, filesystem, join
from pipeline.train.accumulate import check_accumulation

# The loop, the step and Ray Train (torch, timm, Ray) are imported by the functions that run, after
# `run_pretrain`'s checks: a wrong shards path or a bad setting fails in a second, not after those imports.


def check_cpu_budget(cfg: Config, cluster_cpus: float) -> None:
    """Fail fast where the data stage cannot fit beside the training workers.

    Ray Train leaves the data pipeline `cluster CPUs - training CPUs`; if one crop actor and one
    shard-read task per stream do not fit in that, the stream never starts and the run hangs silently.
    """
    if cfg.train.threads_per_worker < 0:
        raise ConfigError(
            f"train.threads_per_worker must be >= 0 (0: int(train.cpus_per_worker)), got {cfg.train.threads_per_worker}"
        )
    streams = 2 if cfg.data.decoupled else 1
    budget = cluster_cpus - cfg.train.world_size * cfg.train.cpus_per_worker
    need = streams * (cfg.views.cpus_per_actor + cfg.data.read_cpus)
    if budget + 1e-9 < need:
        message = (
            f"the data stage needs {need:g} CPUs ({streams} stream(s) x "
            f"(views.cpus_per_actor={cfg.views.cpus_per_actor:g} + "
            f"data.read_cpus={cfg.data.read_cpus:g})) but only {budget:g} of the cluster's {cluster_cpus:g} are left "
            f"after {cfg.train.world_size} training worker(s) x train.cpus_per_worker={cfg.train.cpus_per_worker:g}; "
            "lower those settings or add CPUs"
        )
        if cfg.ray.address:  # an autoscaling cluster may still grow: warn instead of refusing
            console.warn(message)
        else:
            raise ConfigError(message)


def check_shards(cfg: Config) -> None:
    """Every shard set the run reads has its `_stats.json`: a wrong path fails before Ray starts."""
    from pipeline.data.mixing import stream_size

    stream_size(cfg.data.shards, cfg.data.mixture)
    if cfg.data.decoupled:
        stream_size(cfg.data.annotation_shards, cfg.data.annotation_mixture)


def stream_views(cfg: Config, per_stream: int | None = None) -> dict[str, tuple[str, dict[str, float], Any, int]]:
    """{stream: (shards, mixture, views config, seed)}: "train" and, decoupled, "annotations"
    (annotation views from their own shard set, crops without them; `per_stream` crop actors each)."""
    import dataclasses

    if not cfg.data.decoupled:
        return {"train": (cfg.data.shards, cfg.data.mixture, cfg.views, cfg.train.seed)}
    crop_views = dataclasses.replace(cfg.views, annotation_views=0, concurrency=per_stream)
    ann_views = dataclasses.replace(cfg.views, num_views=0, concurrency=per_stream)
    return {
        "train": (cfg.data.shards, cfg.data.mixture, crop_views, cfg.train.seed),
        "annotations": (cfg.data.annotation_shards, cfg.data.annotation_mixture, ann_views, cfg.train.seed + 1),
    }


def build_training_datasets(cfg: Config, cluster_cpus: float) -> dict:
    """Shards -> multi-view crops, as lazy streaming Ray Datasets: {"train"} or, decoupled,
    {"train": propagation crops, "annotations": annotation views}."""
    import ray.data

    from pipeline.data.crop_stage import build_crop_dataset, crop_node_cpus, crop_pool_size
    from pipeline.data.mixing import default_read_concurrency, passes_needed, stream_dataset, stream_size
    from pipeline.data.passes import resume_point_actor
    from pipeline.train.step import Budget
    from pipeline.train.stream import resume_point_name

    # The one-line-per-interval training log is the progress display here; Ray Data's bars from
    # the split coordinator would interleave with it.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Ray Train's ingest takes the driver's preserve_order: one row order, continued exactly on resume.
    context.execution_options.preserve_order = cfg.data.deterministic
    images_needed = (
        Budget.from_config(cfg, cfg.train.world_size).total_steps * cfg.train.batch_size * cfg.train.world_size
    )

    def stream(key: str, shards: str, mixture: dict[str, float], views, seed: int):
        passes = passes_needed(images_needed, stream_size(shards, mixture), cfg.data.max_passes_per_execution)
        readers = (
            default_read_concurrency(crop_pool_size(views))
            if cfg.data.read_concurrency is None
            else cfg.data.read_concurrency
        )
        return stream_dataset(
            shards, mixture, cfg.data.read_cpus, passes, readers, seed, stream=key, resume=resume_point
        )

    name = f"crop-stats-{cfg.train.run_name}"
    resume_point = resume_point_name(cfg)
    resume_point_actor(resume_point)  # the restored loop tells the read tasks here what to skip
    per_stream = None
    if cfg.data.decoupled:
        # Two actor pools share what training leaves (or the crop nodes); each gets a fixed half so
        # neither can take all CPUs and starve the other (the trainer needs a batch from both every step).
        free = crop_node_cpus(cfg.views)
        if free is None:
            free = cluster_cpus - cfg.train.world_size * cfg.train.cpus_per_worker - 2 * cfg.data.read_cpus
        per_stream = cfg.views.concurrency or max(1, int(free / 2 / cfg.views.cpus_per_actor))
    datasets = {}
    for key, (shards, mixture, views, seed) in stream_views(cfg, per_stream).items():
        stats = name if key == "train" else f"{name}-{key}"
        datasets[key] = build_crop_dataset(
            stream(key, shards, mixture, views, seed), views, seed=seed, stats_name=stats
        )
    return datasets


def run_pretrain(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining; returns run id, final checkpoint path and last metrics."""
    cfg = cfg.resolved()
    check_accumulation(cfg)  # train.accum_steps, before any storage or cluster work (the train step checks it again)
    storage = cfg.train.storage_path
    os.makedirs(storage, exist_ok=True) if "://" not in storage else None
    check_access(storage, write=True)  # one clear line for bad credentials or a missing bucket
    check_access(cfg.data.shards, write=False) if not cfg.data.mixture else None
    check_shards(cfg)
    if not 0 <= cfg.train.checkpoint_fraction <= 1:
        raise ConfigError(
            f"train.checkpoint_fraction must be in [0, 1] (0: every checkpoint_every_steps), got "
            f"{cfg.train.checkpoint_fraction}"
        )
    if cfg.train.num_workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0 (0: the loop in the driver), got {cfg.train.num_workers}")
    import ray

    from pipeline.train.step import Budget

    init_ray(cfg.ray)
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    check_cpu_budget(cfg, cluster_cpus)

    try:
        found = latest_checkpoint(storage, cfg.train.run_name)
        record = read_run_record(storage, cfg.train.run_name)
    except OSError as exc:
        raise explain(exc, storage, "looking for checkpoints to resume from") or exc from None
    previous, start_step = (found[0], int(found[1].get("step", 0))) if found else (None, 0)
    if previous:
        console.note(f"resuming run '{cfg.train.run_name}' from {previous}")
    run_id = record.get("mlflow_run_id") if record else None
    init = None  # MAWS stage: resolve train.init_from once here (a resumed run has its own weights)
    if cfg.train.init_from and not previous:
        from pipeline.train.init_from import resolve_init_source

        init = resolve_init_source(
            cfg.train.init_from, cfg.tracking.tracking_uri, cfg.paths.under("init_from", cfg.train.run_name)
        )
    if not run_id:
        run_id = _start_mlflow_run(cfg, init.tags(cfg.train.init_from) if init else None)
        if run_id:  # written once: every later submission of this run logs into the same MLflow run
            write_run_record(
                storage, cfg.train.run_name, {"mlflow_run_id": run_id, "tracking_uri": cfg.tracking.tracking_uri}
            )

    board = console.board_name()  # rank 0 reports its progress to this actor; the driver draws the bar
    loop_config = {
        "config": cfg.to_dict(),
        "mlflow_run_id": run_id,
        "init_from_dir": init.directory if init else None,
        "progress": board,
        # what the loop restores when Ray Train has no checkpoint of its own for the run: one the driver loop
        # (train.num_workers=0) wrote, or one a killed worker uploaded before the controller recorded it
        "resume_from": previous,
    }
    datasets = build_training_datasets(cfg, cluster_cpus)
    fit = _fit_in_driver if cfg.train.num_workers == 0 else _fit_with_ray_train
    logger = tracking.RunLogger(cfg.tracking.tracking_uri, run_id)
    if cfg.tracking.log_preview and not previous:
        _log_preview(cfg, logger)
    started = time.perf_counter()
    total_steps = Budget.from_config(cfg, cfg.train.world_size).total_steps
    try:
        with console.remote_progress(board, "train", total_steps, unit="step", initial=min(start_step, total_steps)):
            checkpoint_path, final = fit(cfg, loop_config, datasets)
    except BaseException as exc:
        _log_learning_curves(cfg, run_id, logger)
        logger.finish("FAILED")
        error = explain(exc, storage, "training") if isinstance(exc, Exception) else None
        if error is not None:  # storage lost mid-run: one line; resubmitting resumes from the last checkpoint
            raise StorageError(f"{error}; resubmit the same job to resume") from None
        raise
    failed, unlogged = (int(final.get(k, 0) or 0) for k in ("mlflow_failed_calls", "mlflow_unlogged_points"))
    if failed:  # the gap, counted and reported: late points arrived, lost ones are named by number
        console.warn(
            f"the MLflow tracking server was away during training ({failed} failed calls); "
            f"{unlogged} metric points/artifacts never reached it"
        )
        logger.metrics({"mlflow_failed_calls": failed, "mlflow_unlogged_points": unlogged}, int(final.get("step", 0)))
    logger.tags({"abpipe.checkpoint_path": checkpoint_path or "", "abpipe.storage_path": storage})
    logger.metrics({"wall_time_s": time.perf_counter() - started}, int(final.get("step", 0)))
    _log_learning_curves(cfg, run_id, logger)
    logger.finish()
    wall_s = time.perf_counter() - started
    metrics, name = dict(final), cfg.train.run_name
    return {"run_id": run_id, "checkpoint": checkpoint_path, "metrics": metrics, "run_name": name, "wall_s": wall_s}


def _train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point, by reference: the loop (timm, the models, the objectives) is imported in the
    workers that run it, not in the driver that only hands it over (about 2 s less start-up per job)."""
    from pipeline.train.loop import train_loop_per_worker

    train_loop_per_worker(loop_config)


def _fit_with_ray_train(cfg: Config, loop_config: dict, datasets: dict) -> tuple[str | None, dict[str, Any]]:
    """TorchTrainer over `train.num_workers` workers: (the last checkpoint's path, the last report's metrics)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = cfg.train.storage_path
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker,
                **({"GPU": 1} if cfg.train.use_gpu else {}),
                **cfg.train.resources_per_worker,
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            **_storage_kwargs(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    path = join(storage, cfg.train.run_name, os.path.basename(checkpoint.path)) if checkpoint else None
    return path, dict(result.metrics)


def _fit_in_driver(cfg: Config, loop_config: dict, datasets: dict) -> tuple[str | None, dict[str, Any]]:
    """`train.num_workers=0`: the same loop in this process on the Ray Data streams (session.DriverSession);
    no controller, worker group or split coordinator to start. No restarts: `train.max_failures` does not apply."""
    import torch

    from pipeline.train.loop import train
    from pipeline.train.session import DriverSession

    session = DriverSession(datasets, cfg.train.storage_path, cfg.train.run_name, cfg.train.keep_checkpoints)
    threads = torch.get_num_threads()  # the loop sets the worker's threads; here the worker is the caller
    try:
        train(
            cfg, session, loop_config["mlflow_run_id"], loop_config["init_from_dir"], progress=loop_config["progress"]
        )
    finally:
        torch.set_num_threads(threads)
    return session.last_checkpoint, dict(session.reported[-1]) if session.reported else {}


def summary_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The pretraining summary table: which run, how far, the last logged loss and rate, where the weights are."""
    metrics = result.get("metrics", {})
    rows: list[tuple[str, Any]] = [("run", result.get("run_name", ""))]
    rows.append(("MLflow run", result.get("run_id") or "(not tracked)"))
    if "step" in metrics:
        rows.append(("steps", int(metrics["step"])))
    labels = {"loss": "loss", "views_per_s": "views/s", "views_seen": "views seen"}
    rows += [(label, metrics[key]) for key, label in labels.items() if key in metrics]
    rows += [("wall time", f"{result['wall_s']:.0f} s")] if "wall_s" in result else []
    rows.append(("checkpoint", result.get("checkpoint") or "(none)"))
    return rows


def _log_preview(cfg: Config, logger: tracking.RunLogger) -> None:
    """Source images with their crop boxes, the crops, the annotation views (pipeline/train/preview.py)."""
    if not logger.enabled:
        return
    try:
        from pipeline.train.preview import log_preview

        log_preview(cfg, logger)
    except Exception as exc:  # noqa: BLE001 - a picture must never stop a run
        console.warn(f"no start-of-run preview images ({type(exc).__name__}: {exc})")


def _log_learning_curves(cfg: Config, run_id: str | None, logger: tracking.RunLogger) -> None:
    if not (cfg.tracking.log_preview and logger.enabled and run_id):
        return
    try:
        from pipeline.train.preview import log_learning_curves

        log_learning_curves(cfg.tracking.tracking_uri, run_id, logger, f"{cfg.train.run_name} ({cfg.objective.name})")
    except Exception as exc:  # noqa: BLE001
        console.warn(f"no learning-curve figure ({type(exc).__name__}: {exc})")


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
        console.warn(f"MLflow unavailable ({exc}); training without tracking")
        return None
