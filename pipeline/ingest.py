"""`abpipe ingest`: list a source's inputs, write the shard set, report counts (and log them to MLflow)."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.data.shards import write_shards
from pipeline.data.sources.image_folder import list_image_files, list_image_folder
from pipeline.runtime import init_ray

SOURCES = {"image_folder": list_image_folder, "files": list_image_files}


def run_ingest(cfg: Config) -> dict[str, Any]:
    cfg = cfg.resolved()
    ing = cfg.ingest
    if ing.source not in SOURCES:
        raise ConfigError(f"ingest.source must be one of {sorted(SOURCES)}, got {ing.source!r}")
    if not ing.input:
        raise ConfigError("ingest.input is required (a folder for image_folder, a text file of paths for files)")
    items = SOURCES[ing.source](ing.input)
    init_ray(cfg.ray)
    stats = write_shards(items, ing.output, ing.source, ing)
    stats["output"] = ing.output
    counts = ", ".join(f"{k}={v}" for k, v in stats["counts"].items())
    print(f"[abpipe] ingest {ing.source}: {stats['total']} inputs -> {counts}; {len(stats['shards'])} shards in {ing.output}", flush=True)
    _log_to_mlflow(cfg, stats)
    return stats


def _log_to_mlflow(cfg: Config, stats: dict[str, Any]) -> None:
    """An ingest run records what went in and what was skipped, as the lineage root of training."""
    from pipeline.train.tracking import RunLogger, start_run

    try:
        params = {k: v for k, v in cfg.flat().items() if k.startswith("ingest.")}
        run_id = start_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, "ingest", params, {"abpipe.kind": "ingest", "abpipe.output": cfg.ingest.output})
    except Exception as exc:
        print(f"[abpipe] WARNING: MLflow unavailable, ingest counts not tracked: {exc}", flush=True)
        return
    logger = RunLogger(cfg.tracking.tracking_uri, run_id)
    logger.metrics({f"count_{k}": v for k, v in stats["counts"].items()} | {"total": stats["total"]}, 0)
    logger.finish()
    stats["run_id"] = run_id
