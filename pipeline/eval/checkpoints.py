"""Which weights an evaluation reads: checkpoint references, their identity, the random-init reference.

A checkpoint is named three ways: a local directory, `runs:/<run id>/<artifact dir>` (logged to
MLflow by the training loop), or a pretraining run id. Its *key* (`<run id>@<step>`) is what eval
runs are tagged with and what a sweep matches on; its *fingerprint* (sha256 of the weights file)
is what the feature cache is keyed on, so a copied or re-downloaded checkpoint still hits the cache.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from pipeline.config import Config
from pipeline.models.checkpoint import META_FILE, STATE_FILE, CheckpointError, file_sha256, read_meta, save_checkpoint

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUNS_URI = re.compile(r"runs:/([0-9a-f]{32})/(.+)")


def resolve_checkpoint(ref: str, tracking_uri: str, download_dir: str) -> tuple[str, str | None, str]:
    """(local checkpoint dir, pretraining run id or None, what to record as its path).

    `ref` is a checkpoint directory, `runs:/<run id>/<artifact dir>`, or the MLflow run id of a
    pretraining run. For a bare run id, the local path in its `abpipe.checkpoint_path` tag is used
    when this machine has it; otherwise the artifact dir named by `abpipe.checkpoint_artifact` is
    downloaded into `download_dir`.
    """
    if os.path.isdir(ref):
        read_meta(ref)
        return ref, None, os.path.abspath(ref)
    runs_uri = _RUNS_URI.fullmatch(ref)
    if runs_uri:
        return _download(runs_uri.group(1), runs_uri.group(2), tracking_uri, download_dir), runs_uri.group(1), ref
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
    return _download(ref, artifact, tracking_uri, download_dir), ref, f"runs:/{ref}/{artifact}"


def _download(run_id: str, artifact: str, tracking_uri: str, download_dir: str) -> str:
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=download_dir, tracking_uri=tracking_uri)
    except Exception as exc:
        raise CheckpointError(f"run {run_id}: cannot download checkpoint artifact '{artifact}': {exc}") from None
    read_meta(path)
    return path


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_fingerprint(ckpt_dir: str) -> str:
    """sha256 of the checkpoint's weights file (memoised per path/size/mtime in this process)."""
    path = os.path.join(ckpt_dir, STATE_FILE)
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(f"checkpoint has no {STATE_FILE}: {ckpt_dir}") from None
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = file_sha256(path)
    return "sha256:" + _HASHES[memo]


def checkpoint_key(meta: dict[str, Any], source_run: str | None, fingerprint: str) -> str:
    """`<pretraining run id>@<step>` (how a sweep names a checkpoint before opening it), else the hash."""
    run = meta.get("mlflow_run_id") or source_run
    if run and meta.get("step") is not None:
        return f"{run}@{int(meta['step'])}"
    return fingerprint[:27]


def write_random_init(model_cfg: Config, directory: str) -> str:
    """The exact encoder the pretraining started from: every objective builds it first after seeding."""
    import torch

    from pipeline.models.encoder import build_encoder

    if os.path.isfile(os.path.join(directory, META_FILE)):
        return directory
    torch.manual_seed(model_cfg.train.seed)
    state = build_encoder(model_cfg.model, model_cfg.views.view_size).state_dict()
    save_checkpoint(directory, {"encoder_teacher": state, "encoder_student": state}, {"config": model_cfg.to_dict(), "step": 0})
    return directory


def random_init_fingerprint(model_cfg: Config) -> str:
    """Names the random-init encoder by its recipe (architecture, input size, seed, library versions)."""
    import timm
    import torch

    from pipeline.eval.cache import digest

    recipe = {"model": dataclasses.asdict(model_cfg.model), "size": model_cfg.views.view_size, "seed": model_cfg.train.seed}
    return "random:" + digest({**recipe, "torch": torch.__version__, "timm": timm.__version__})
