"""The evaluation job: frozen-feature probes of a pretrained checkpoint, logged as an MLflow run.

Every probe is also run on the *randomly initialised* model the pretraining started from (same
config, same seed): a random ViT is a surprisingly strong kNN baseline on easy data, so only the
difference says whether pretraining helped.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ConfigError
from pipeline.models.checkpoint import META_FILE, CheckpointError, load_frozen_model, read_meta, save_checkpoint
from pipeline.runtime import init_ray

log = logging.getLogger("abpipe.eval")

_RUN_ID = re.compile(r"[0-9a-f]{32}")
RANDOM_PREFIX = "random_init/"


def resolve_checkpoint(ref: str, tracking_uri: str, download_dir: str) -> tuple[str, str | None, str]:
    """(local checkpoint dir, pretraining run id or None, what to record as its path).

    `ref` is a checkpoint directory or the MLflow run id of a pretraining run. For a run, the
    local path in its `abpipe.checkpoint_path` tag is used when this machine has it; otherwise the
    artifact dir named by `abpipe.checkpoint_artifact` is downloaded into `download_dir`.
    """
    if os.path.isdir(ref):
        read_meta(ref)
        return ref, None, os.path.abspath(ref)
    if not _RUN_ID.fullmatch(ref):
        raise CheckpointError(f"checkpoint directory not found: {ref}")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(ref)
    except MlflowException as exc:
        raise CheckpointError(f"{ref} is neither a checkpoint directory nor a run in {tracking_uri}: {exc.message}") from None
    tags = run.data.tags
    local = tags.get("abpipe.checkpoint_path", "")
    if local and os.path.isfile(os.path.join(local, META_FILE)):
        return local, ref, local
    artifact = tags.get("abpipe.checkpoint_artifact", "")
    if not artifact:
        raise CheckpointError(f"run {ref}: no local checkpoint ({local or 'no abpipe.checkpoint_path tag'}) and no abpipe.checkpoint_artifact tag")
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=artifact, dst_path=download_dir, tracking_uri=tracking_uri)
    except Exception as exc:
        raise CheckpointError(f"run {ref}: cannot download checkpoint artifact '{artifact}': {exc}") from None
    read_meta(path)
    return path, ref, f"runs:/{ref}/{artifact}"


def list_labelled_folder(root: str) -> list[dict[str, str]]:
    """[{input, label}] for root/<label>/<file>: the ingest lister's items that carry a class."""
    from pipeline.data.sources.image_folder import list_image_folder

    if not Path(root).is_dir():
        raise ConfigError(f"eval.dataset: not a folder: {root}")
    items = [{"input": it["input"], "label": it["labels"][0]} for it in list_image_folder(root) if it["labels"]]
    if not items:
        raise ConfigError(f"eval.dataset: no images in class sub-folders of {root}")
    return items


def _split(labels: list[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    counts = {c: labels.count(c) for c in set(labels)}
    small = sorted(c for c, n in counts.items() if n < 2)
    if small:
        raise ValueError(f"classes with fewer than 2 readable images cannot be split: {small}")
    return train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)


def _results_table(metrics: dict[str, float]) -> list[tuple[str, float, float | None]]:
    return [(k, v, metrics.get(RANDOM_PREFIX + k)) for k, v in metrics.items() if not k.startswith(RANDOM_PREFIX)]


def _write_results(out_dir: str, rows, info: dict[str, Any]) -> list[str]:
    md = [f"# Eval of `{info['checkpoint']}` (step {info['step']})", ""]
    md += [f"{info['n_train']} train / {info['n_test']} test images, {info['n_classes']} classes, skipped: {info['skipped'] or 'none'}", ""]
    md += ["| metric | pretrained | random init | delta |", "|---|---|---|---|"]
    md += [f"| {k} | {v:.4f} | {r:.4f} | {v - r:+.4f} |" if r is not None else f"| {k} | {v:.4f} | | |" for k, v, r in rows]
    paths = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.csv")]
    Path(paths[0]).write_text("\n".join(md) + "\n")
    with open(paths[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric", "pretrained", "random_init"])
        writer.writerows([(k, v, "" if r is None else r) for k, v, r in rows])
    return paths


def run_eval(cfg: Config) -> dict[str, Any]:
    """Probe `cfg.eval.checkpoint` on `cfg.eval.dataset`; returns {run_id, metrics, ...}."""
    import torch

    from pipeline.eval.features import extract_features_multi
    from pipeline.eval.probes import PROBES
    from pipeline.train.tracking import RunLogger, start_run

    cfg = cfg.resolved()
    ev = cfg.eval
    if not ev.checkpoint:
        raise ConfigError("eval.checkpoint: give a checkpoint directory or a pretraining MLflow run id")
    unknown = [p for p in ev.probes if p not in PROBES]
    if unknown or not ev.probes:
        raise ConfigError(f"eval.probes: unknown {unknown or '(empty)'}; known: {', '.join(PROBES)}")
    if not 0 < ev.test_fraction < 1:
        raise ConfigError(f"eval.test_fraction: must be in (0, 1), got {ev.test_fraction}")
    if not ev.dataset:
        raise ConfigError("eval.dataset: give a labelled image folder (one sub-folder per class)")
    items = list_labelled_folder(ev.dataset)
    uri = cfg.tracking.tracking_uri
    init_ray(cfg.ray)

    with tempfile.TemporaryDirectory(prefix="abpipe-eval-") as tmp:
        ckpt_dir, source_run, recorded_path = resolve_checkpoint(ev.checkpoint, uri, os.path.join(tmp, "download"))
        model, model_cfg = load_frozen_model(ckpt_dir)  # validates weights on the driver, clear errors
        meta = read_meta(ckpt_dir)
        parent = meta.get("mlflow_run_id") or source_run
        image_size = model_cfg.views.view_size  # the ViT's position embeddings fix its input size
        if ev.image_size and ev.image_size != image_size:
            log.warning("eval.image_size=%d ignored: the checkpoint's encoder takes %d px inputs (views.view_size)", ev.image_size, image_size)

        # The reference: the exact weights pretraining started from (the trainer seeds the same way).
        torch.manual_seed(model_cfg.train.seed)
        from pipeline.models.ab_model import build_model

        random_model = build_model(model_cfg.model, image_size).state_dict()
        random_dir = os.path.join(tmp, "random_init")
        save_checkpoint(random_dir, {"teacher": random_model, "student": random_model}, {"config": model_cfg.to_dict(), "step": 0})
        del model, random_model

        tags = {"abpipe.kind": "eval", "abpipe.checkpoint_path": recorded_path, "abpipe.checkpoint_step": str(meta.get("step", ""))}
        if parent:
            tags.update({"abpipe.parent_run_id": parent, "mlflow.parentRunId": parent})
        params = {k: v for k, v in cfg.flat().items() if k.startswith("eval.")}
        params.update({"eval.image_size": image_size, "model.encoder": model_cfg.model.encoder, "model.encoder_kwargs": model_cfg.model.encoder_kwargs})
        run_id = start_run(uri, cfg.tracking.experiment, "eval", params, tags)
        logger = RunLogger(uri, run_id)
        try:
            feats, labels, skipped = extract_features_multi(
                {"pretrained": ckpt_dir, "random": random_dir}, items, image_size, ev.batch_size, which=ev.weights, use_gpu=ev.use_gpu
            )
            train_idx, test_idx = _split(labels, ev.test_fraction, ev.seed)
            y = np.asarray(labels)
            metrics: dict[str, float] = {}
            for prefix, name in (("", "pretrained"), (RANDOM_PREFIX, "random")):
                x = feats[name]
                for probe in ev.probes:
                    for key, value in PROBES[probe](x[train_idx], y[train_idx], x[test_idx], y[test_idx], ev).items():
                        metrics[f"{prefix}{probe}_{key}"] = value
            info = {
                "checkpoint": recorded_path,
                "step": meta.get("step", "?"),
                "n_train": len(train_idx),
                "n_test": len(test_idx),
                "n_classes": len(set(labels)),
                "skipped": skipped,
            }
            logger.metrics({**metrics, **{f"skipped_{k}": v for k, v in skipped.items()}, "n_train": info["n_train"], "n_test": info["n_test"]}, step=0)
            rows = _results_table(metrics)
            for path in _write_results(tmp, rows, info):
                logger.artifact(path)
        except BaseException:
            logger.finish("FAILED")
            raise
        logger.finish()

    print(f"[abpipe] eval of {recorded_path}: {info['n_train']} train / {info['n_test']} test, skipped {skipped or 'none'}")
    print(f"  {'metric':<18}{'pretrained':>11}{'random init':>13}")
    for key, value, ref in rows:
        print(f"  {key:<18}{value:>11.4f}{'' if ref is None else f'{ref:>13.4f}'}")
    return {"run_id": run_id, "parent_run_id": parent, "checkpoint": recorded_path, "metrics": metrics, **{k: info[k] for k in ("n_train", "n_test", "n_classes", "skipped")}}
