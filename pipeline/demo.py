"""The end-to-end demo on data that ships with installed packages: ingest -> pretrain -> eval.

Pretraining sees scikit-learn's handwritten digits as *unlabelled* images; the evaluation probes
(kNN, linear) then use their labels on a held-out split, next to a randomly initialised encoder of
the same architecture, so the printout shows whether pretraining helped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

from pipeline.config import load_config, packaged_config

DEFAULT_CONFIG = packaged_config("tiny.yaml")  # package data: the demo runs from any install


def run_demo(config_path: str | None = None, overrides: Sequence[str] = ()) -> dict:
    from pipeline.data.sample_data import write_digits_folder
    from pipeline.eval.job import run_eval
    from pipeline.ingest import run_ingest
    from pipeline.train.trainer import run_pretrain

    cfg = load_config(config_path or DEFAULT_CONFIG, overrides).resolved()
    timings: dict[str, float] = {}
    digits_dir = Path(cfg.paths.under("data", "digits"))

    t0 = time.perf_counter()
    if not digits_dir.is_dir():
        write_digits_folder(digits_dir, size=cfg.views.view_size)
    shards_dir = cfg.paths.under("shards", "digits")
    cfg = dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, source="image_folder", input=str(digits_dir), output=shards_dir),
        data=dataclasses.replace(cfg.data, shards=shards_dir),
    )
    stats = run_ingest(cfg)
    timings["ingest_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = run_pretrain(cfg)
    timings["pretrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, checkpoint=train["run_id"] or train["checkpoint"], dataset=str(digits_dir)),
    )
    evaluation = run_eval(cfg)
    timings["eval_s"] = time.perf_counter() - t0

    db = cfg.tracking.tracking_uri
    _print_summary(stats, train, evaluation, timings, shards_dir, db, cfg.objective.name, cfg.train.batch_size)
    return {
        "ingest": stats.get("counts"),
        "pretrain": train,
        "eval": evaluation,
        "timings": timings,
        "tracking_uri": db,
        "root": os.fspath(cfg.paths.root),
    }


def _print_summary(
    stats: dict,
    train: dict,
    evaluation: dict,
    timings: dict,
    shards_dir: str,
    db: str,
    method: str = "ab_simclr",
    batch: int = 64,
) -> None:
    """Two compact tables: what each stage did (with the losses against chance), and the probes of the
    pretrained encoder next to a random init of the same ViT."""
    import math

    from pipeline import console
    from pipeline.eval.job import summary_rows

    header, rows = summary_rows(evaluation)
    title = f"eval of {method}: pretrained vs a random init of the same ViT (checkpoint step {evaluation.get('step')})"
    console.summary(title, rows, header)
    counts = dict(stats.get("counts") or {})
    kept = counts.pop("ok", 0)
    metrics = train.get("metrics", {})
    terms = ", ".join(f"{k[5:]} {v:.2f}" for k, v in metrics.items() if k.startswith("loss_"))
    steps = (
        f"{int(metrics.get('step', 0))} steps, loss {terms or metrics.get('loss', float('nan'))} "
        f"(chance: log {batch} = {math.log(batch):.2f} nats each), {metrics.get('views_per_s', 0):.0f} views/s"
    )
    tasks = len(evaluation.get("tasks", {}))
    stages = [
        ("ingest", f"{kept} kept, {sum(counts.values())} skipped -> {shards_dir}", round(timings["ingest_s"])),
        ("pretrain", f"{steps}; MLflow run {train.get('run_id')}", round(timings["pretrain_s"])),
        ("checkpoint", train.get("checkpoint"), None),
        ("eval", f"{tasks} task(s), MLflow runs under the pretraining run", round(timings["eval_s"])),
        ("results", f"mlflow ui --backend-store-uri {db}  (then open http://127.0.0.1:5000)", None),
    ]
    console.summary("abpipe demo", stages, ["stage", "result", "seconds"])
