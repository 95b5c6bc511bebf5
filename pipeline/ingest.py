"""`abpipe ingest`: turn a source into a shard set, report counts per status (and log them to MLflow).

`SOURCES` maps a source name to a function `Config -> stats`. Most sources only list their items
(`list_items(IngestConfig) -> [{input, id, labels?, captions?, ...}]`) and share `write_shards`, one
Ray Data task per shard; URL lists (`cc12m`, alias `urls`) are downloaded by img2dataset and
normalised by their own runner. Source modules are imported when used, not when the CLI starts.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pipeline import console
from pipeline.config import Config, ConfigError, IngestConfig

ListItems = Callable[[IngestConfig], list[dict]]


def _via_write_shards(list_items: ListItems) -> Callable[[Config], dict[str, Any]]:
    """A source whose listed items are read, validated and sharded by `write_shards` on Ray."""

    def run(cfg: Config) -> dict[str, Any]:
        from pipeline.data.shards import write_shards
        from pipeline.runtime import init_ray

        items = list_items(cfg.ingest)
        init_ray(cfg.ray)
        return write_shards(items, cfg.ingest.output, cfg.ingest.source, cfg.ingest)

    return run


def _lazy_list_items(module: str) -> ListItems:
    """`<module>.list_items`, imported on first use (its dependencies stay out of CLI start-up)."""

    def list_items(ing: IngestConfig) -> list[dict]:
        return importlib.import_module(module).list_items(ing)

    return list_items


def shuffled(items: list[dict], ing: IngestConfig) -> list[dict]:
    """The listing in a seeded order (`ingest.shuffle`, `ingest.shuffle_seed`), the same on every call.

    A class-folder listing is sorted by class, so its shards would each hold one or two classes, and
    the trainer's local shuffle buffer (`data.shuffle_buffer` rows) cannot mix what is far apart: a
    contrastive batch would draw its negatives from one class. `data.deterministic` reads rows in
    shard order with no shuffle at all, so there the shards' own order is the batches' order."""
    if not ing.shuffle:
        return items
    import numpy as np

    order = np.random.default_rng(ing.shuffle_seed).permutation(len(items))
    return [items[i] for i in order]


def _image_folder(ing: IngestConfig) -> list[dict]:
    from pipeline.data.sources.image_folder import list_image_folder

    return shuffled(list_image_folder(ing.input), ing)


def _file_list(ing: IngestConfig) -> list[dict]:
    from pipeline.data.sources.image_folder import list_image_files

    return shuffled(list_image_files(ing.input), ing)


def _url_list(cfg: Config) -> dict[str, Any]:
    from pipeline.data.sources.url_captions import ingest_url_captions

    return ingest_url_captions(cfg.ingest, cfg.ray, cfg.ingest.source)


SOURCES: dict[str, Callable[[Config], dict[str, Any]]] = {
    "image_folder": _via_write_shards(_image_folder),
    "files": _via_write_shards(_file_list),
    "coco": _via_write_shards(_lazy_list_items("pipeline.data.sources.coco")),
    "epic_kitchens": _via_write_shards(_lazy_list_items("pipeline.data.sources.epic_kitchens")),
    "cc12m": _url_list,
    "urls": _url_list,
}


def run_ingest(cfg: Config) -> dict[str, Any]:
    cfg = cfg.resolved()
    ing = cfg.ingest
    if ing.source not in SOURCES:
        raise ConfigError(f"ingest.source must be one of {sorted(SOURCES)}, got {ing.source!r}")
    if not ing.input:
        raise ConfigError(
            f"ingest.input is required for source {ing.source!r} (--input/--urls PATH, or ingest.input=PATH)"
        )
    stats = SOURCES[ing.source](cfg)
    stats["output"] = ing.output
    _log_to_mlflow(cfg, stats)
    return stats


def summary_rows(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """The ingest's summary table: what went in, what was kept, why the rest was skipped, where it went."""
    counts = dict(stats.get("counts", {}))
    kept = counts.pop("ok", 0)
    rows: list[tuple[str, Any]] = [("source", stats.get("source", "")), ("inputs", stats.get("total", 0))]
    rows.append(("kept", kept))
    rows += [(f"skipped: {reason}", n) for reason, n in counts.items()] or [("skipped", 0)]
    rows += [(name.replace("_", " "), n) for name, n in stats.get("annotations", {}).items()]
    rows.append(("shards", f"{len(stats.get('shards', []))} in {stats.get('output', '')}"))
    if stats.get("run_id"):
        rows.append(("MLflow run", stats["run_id"]))
    return rows


def _log_to_mlflow(cfg: Config, stats: dict[str, Any]) -> None:
    """An ingest run records what went in and what was skipped, as the lineage root of training."""
    from pipeline.tracking import RunLogger, start_run

    try:
        params = {k: v for k, v in cfg.flat().items() if k.startswith("ingest.")}
        run_id = start_run(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            "ingest",
            params,
            {"abpipe.kind": "ingest", "abpipe.output": cfg.ingest.output},
        )
    except Exception as exc:
        console.warn(f"MLflow unavailable, ingest counts not tracked: {exc}")
        return
    logger = RunLogger(cfg.tracking.tracking_uri, run_id)
    extra = {"seconds": stats["seconds"]} if "seconds" in stats else {}
    logger.metrics({f"count_{k}": v for k, v in stats["counts"].items()} | {"total": stats["total"]} | extra, 0)
    logger.finish()
    stats["run_id"] = run_id
