"""Checkpoint format: a directory with `state.pt` (weights, optimiser, counters) and `meta.json`.

`meta.json` (step, seen views, MLflow run id, config) is readable without torch, so the driver can
find the MLflow run to resume into and the eval job can find the model config. Loading uses
`weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, config_from_dict

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable; the message names the path."""


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> Path:
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


def load_frozen_model(directory: str | os.PathLike, which: str = "teacher", device: str | torch.device = "cpu"):
    """(FrozenEncoder in eval mode without grads, Config) from a checkpoint directory.

    `which` picks the EMA teacher (default: the smoother weights, as DINO evaluates) or the student;
    methods without a teacher store the student under both names.
    """
    from pipeline.models.encoder import FrozenEncoder, build_encoder

    cfg = checkpoint_config(directory)
    state = load_state(directory, map_location=device)
    if which not in ("teacher", "student"):
        raise ValueError("which must be 'teacher' or 'student'")
    model = FrozenEncoder(build_encoder(cfg.model, cfg.views.view_size))
    try:
        model.encoder.load_state_dict(encoder_state(state, which))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model config: {exc}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg
