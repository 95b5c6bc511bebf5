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
    print("\n=== abpipe demo finished ===")
    print(f"ingest:    {stats.get('counts')} -> {shards_dir}")
    print(f"pretrain:  MLflow run {train['run_id']}, checkpoint {train['checkpoint']}")
    print(f"eval:      {_metrics_line(evaluation)}")
    print("timings:   " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"results:   mlflow ui --backend-store-uri {db}   (then open http://127.0.0.1:5000)")
    return {
        "ingest": stats.get("counts"),
        "pretrain": train,
        "eval": evaluation,
        "timings": timings,
        "tracking_uri": db,
        "root": os.fspath(cfg.paths.root),
    }


def _metrics_line(evaluation: dict) -> str:
    metrics = evaluation.get("metrics", evaluation)
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if isinstance(v, float))
