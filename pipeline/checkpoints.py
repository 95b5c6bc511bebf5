"""Checkpoints, the one module for them: their format, where a run's latest one is, what a reference names.

Format: a directory with `state.pt` (weights, optimiser, counters) and `meta.json`. `meta.json` (step,
seen views, config) is readable without torch, so the driver can find a run's latest step and the eval
job the model config. Loading uses `weights_only=True`: a checkpoint is data, never code.

A checkpoint is named three ways: a local directory, `runs:/<run id>/<artifact dir>` (logged to
MLflow by the training loop), or a pretraining run id. Its *key* (`<run id>@<step>`) is what eval
runs are tagged with and what a sweep matches on; its *fingerprint* (sha256 of the weights file)
is what the feature cache is keyed on, so a copied or re-downloaded checkpoint still hits the cache.

Training, evaluation and staged (MAWS) runs all read checkpoints, so this module sits below them
and imports nothing of theirs (models build the encoder a checkpoint holds: `models.encoder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, config_from_dict
from pipeline.storage import copy_to_local, explain, filesystem, join

if TYPE_CHECKING:
    import torch

# torch is imported where weights are saved or loaded, not here: the CLI checks a checkpoint
# reference (and reads meta.json) without torch's import, so a wrong path fails in a second.

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable; the message names the path."""


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / STATE_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory, META_FILE)
    if not path.is_file():
        raise CheckpointError(f"not an abpipe checkpoint (no {META_FILE}): {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from None


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    import torch

    path = Path(directory, STATE_FILE)
    if not path.is_file():
        raise CheckpointError(f"checkpoint has no {STATE_FILE}: {directory}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path}: {exc}") from None


def checkpoint_config(directory: str | os.PathLike) -> Config:
    return config_from_dict(read_meta(directory)["config"])


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_state(state: dict[str, Any], which: str) -> dict[str, Any]:
    """The bare ViT weights of `which` (teacher|student) from any abpipe checkpoint state.

    Checkpoints written by the method-agnostic loop carry `encoder_<which>`; AB-model state dicts
    (`<which>` holding the whole ABModel, as older checkpoints and the eval job's random-init
    reference do) keep the encoder under the `encoder.` prefix.
    """
    if f"encoder_{which}" in state:
        return state[f"encoder_{which}"]
    if which in state:
        prefix = "encoder."
        return {k[len(prefix) :]: v for k, v in state[which].items() if k.startswith(prefix)}
    raise KeyError(f"no '{which}' encoder weights (keys: {sorted(state)})")


_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUNS_URI = re.compile(r"runs:/([0-9a-f]{32})/(.+)")


def check_reference(ref: str) -> str:
    """What `ref` names, told without MLflow, object storage or torch: "dir" (a local checkpoint,
    its meta.json read), "storage" (a URI), "runs" (`runs:/<run id>/<dir>`) or "run_id".

    CheckpointError for a local path that is no checkpoint: callers check this first, so a typo
    fails in a second, before the heavy imports and the cluster start."""
    if os.path.isdir(ref):
        read_meta(ref)
        return "dir"
    if "://" in ref and not ref.startswith("runs:/"):  # s3://, gs://, any storage Ray Train writes to
        return "storage"
    if _RUNS_URI.fullmatch(ref):
        return "runs"
    if not _RUN_ID.fullmatch(ref):
        raise CheckpointError(f"checkpoint directory not found: {ref}")
    return "run_id"


def resolve_checkpoint(ref: str, tracking_uri: str, download_dir: str) -> tuple[str, str | None, str]:
    """(local checkpoint dir, pretraining run id or None, what to record as its path).

    `ref` is a checkpoint directory, `runs:/<run id>/<artifact dir>`, or the MLflow run id of a
    pretraining run. For a bare run id, the local path in its `abpipe.checkpoint_path` tag is used
    when this machine has it; otherwise the artifact dir named by `abpipe.checkpoint_artifact` is
    downloaded into `download_dir`.
    """
    kind = check_reference(ref)
    if kind == "dir":
        return ref, None, os.path.abspath(ref)
    if kind == "storage":
        return _copy_from_storage(ref, download_dir), None, ref
    if kind == "runs":
        run_id, artifact = _RUNS_URI.fullmatch(ref).groups()
        return _download(run_id, artifact, tracking_uri, download_dir), run_id, ref
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(ref)
    except MlflowException as exc:
        raise CheckpointError(
            f"{ref} is neither a checkpoint directory nor a run in {tracking_uri}: {exc.message}"
        ) from None
    tags = run.data.tags
    local = tags.get("abpipe.checkpoint_path", "")
    if local and os.path.isfile(os.path.join(local, META_FILE)):
        return local, ref, local
    if "://" in local:
        return _copy_from_storage(local, download_dir), ref, local
    artifact = tags.get("abpipe.checkpoint_artifact", "")
    if not artifact:
        raise CheckpointError(
            f"run {ref}: no local checkpoint ({local or 'no abpipe.checkpoint_path tag'}) and no "
            "abpipe.checkpoint_artifact tag"
        )
    return _download(ref, artifact, tracking_uri, download_dir), ref, f"runs:/{ref}/{artifact}"


def _copy_from_storage(uri: str, download_dir: str) -> str:
    """A checkpoint folder on object storage, copied to `download_dir` through the storage filesystem."""
    target = os.path.join(download_dir, uri.rstrip("/").rsplit("/", 1)[-1])
    try:
        copy_to_local(uri, target)
    except OSError as exc:
        raise CheckpointError(f"cannot copy checkpoint {uri}: {explain(exc, uri) or exc}") from None
    read_meta(target)
    return target


def _download(run_id: str, artifact: str, tracking_uri: str, download_dir: str) -> str:
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=download_dir, tracking_uri=tracking_uri
        )
    except Exception as exc:
        hint = ""
        if (
            tracking_uri.startswith(("http://", "https://"))
            and "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" not in os.environ
        ):
            hint = (
                " (a tracking server on object storage hands out presigned URLs to download from the store "
                "itself; if the nodes cannot reach it or it refuses them, set "
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false: docs/operations.md)"
            )
        raise CheckpointError(f"run {run_id}: cannot download checkpoint artifact '{artifact}': {exc}{hint}") from None
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


_CHECKPOINT_DIR = re.compile(r"checkpoint_\d+")


def checkpoint_step(path: str | None) -> int:
    """The step in a checkpoint folder's name (`.../checkpoint_00000120` -> 120); -1 for None or another name."""
    name = posixpath.basename((path or "").rstrip("/"))
    return int(name.split("_", 1)[1]) if _CHECKPOINT_DIR.fullmatch(name) else -1


def list_checkpoints(storage_path: str, run_name: str) -> list[str]:
    """The names of a run's checkpoint folders (complete or not), oldest first: `checkpoint_<step, 8 digits>`."""
    import pyarrow.fs as pafs

    fs, base = filesystem(storage_path)
    infos = fs.get_file_info(pafs.FileSelector(f"{base.rstrip('/')}/{run_name}", allow_not_found=True))
    dirs = (i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return sorted(name for name in dirs if _CHECKPOINT_DIR.fullmatch(name))


def latest_checkpoint(storage_path: str, run_name: str) -> tuple[str, dict[str, Any]] | None:
    """(path or URI, meta) of a run's newest complete checkpoint (by step), or None for a fresh run.

    Listed through the storage's own filesystem, so a job resubmitted on s3:// (or any pyarrow /
    fsspec storage) finds the MLflow run id its checkpoints carry, as a local one does. A checkpoint
    folder without a readable meta.json was cut short and does not count."""
    fs, base = filesystem(storage_path)
    best, best_step = None, -1
    for name in list_checkpoints(storage_path, run_name):
        try:
            with fs.open_input_stream(f"{base.rstrip('/')}/{run_name}/{name}/{META_FILE}") as stream:
                meta = json.loads(stream.read())
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if step > best_step:
            best, best_step = (join(storage_path, run_name, name), meta), step
    return best


# The run's record: the MLflow run a training run logs to, written once by the driver when it creates
# that run, next to the run's checkpoints. A re-submitted job (same storage path and run name) reads it
# and logs into the same MLflow run; Ray Train's own restarts keep the driver, so they need nothing.
RUN_RECORD = "abpipe_run.json"


def _run_file(storage_path: str, run_name: str):
    """(pyarrow filesystem, path of the run's record) for a local or URI storage path."""
    import pyarrow.fs as pafs

    if "://" in storage_path:
        fs, base = pafs.FileSystem.from_uri(storage_path)
    else:
        fs, base = pafs.LocalFileSystem(), os.path.abspath(storage_path)
    return fs, f"{base.rstrip('/')}/{run_name}/{RUN_RECORD}"


def read_run_record(storage_path: str, run_name: str) -> dict[str, Any] | None:
    """The record of run `run_name` under `storage_path`, or None for a run not started yet."""
    import pyarrow.fs as pafs

    fs, path = _run_file(storage_path, run_name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        try:
            return json.loads(stream.read().decode())
        except ValueError as exc:
            raise CheckpointError(f"corrupt run record {path}: {exc}") from None


def write_run_record(storage_path: str, run_name: str, record: dict[str, Any]) -> None:
    """Write the run's record; it is written once, so an existing record is an error."""
    fs, path = _run_file(storage_path, run_name)
    if read_run_record(storage_path, run_name) is not None:
        raise CheckpointError(f"run record {path} exists: a run's record is written once")
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(record, indent=1, sort_keys=True).encode())


def latest_checkpoint_dir(storage_path: str, run_name: str) -> str | None:
    """The newest complete checkpoint of a run (by step), or None for a fresh run."""
    found = latest_checkpoint(storage_path, run_name)
    return found[0] if found else None
