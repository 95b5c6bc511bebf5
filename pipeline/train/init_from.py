"""MAWS-style staged pretraining: start a run from another run's encoder (`train.init_from`).

Singh et al. (2023) pre-pretrain with MAE, then initialise the next stage's encoder from it and
train everything else from scratch. Here `train.init_from` names any abpipe checkpoint (directory,
`runs:/<run id>/<dir>`, or the MLflow run id of a pretraining run); its encoder
(`train.init_weights`: teacher | student) is loaded into *every* encoder of the new objective — the
student and its EMA teacher start equal — while decoders, heads, centres and the optimiser stay
fresh. When the patch grid differs (another view size), the position embeddings are resampled
with timm's `resample_abs_pos_embed`. The driver resolves the reference once and records the
lineage (parent run, sha256 of the weights file) as MLflow tags of the new run.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.checkpoints import (
    STATE_FILE,
    CheckpointError,
    encoder_state,
    file_sha256,
    load_state,
    read_meta,
    resolve_checkpoint,
)
from pipeline.config import Config, ConfigError


@dataclass
class InitSource:
    """A resolved `train.init_from`: where its files are and what to record about it."""

    directory: str  # local checkpoint directory (state.pt + meta.json)
    parent_run_id: str | None  # the MLflow run that wrote it, when known
    sha256: str  # of its state.pt: names exactly which weights started this run
    step: int | None
    objective: str

    def tags(self, reference: str) -> dict[str, str]:
        """MLflow tags of the new run: its lineage back to the stage it started from."""
        tags = {
            "abpipe.init_from": reference,
            "abpipe.init_checkpoint_sha256": self.sha256,
            "abpipe.init_checkpoint_step": "" if self.step is None else str(self.step),
            "abpipe.init_objective": self.objective,
        }
        if self.parent_run_id:
            tags["abpipe.parent_run_id"] = self.parent_run_id
        return tags


def resolve_init_source(reference: str, tracking_uri: str, download_dir: str) -> InitSource:
    """Find the checkpoint `reference` names (downloading MLflow artifacts into `download_dir`)."""
    try:
        directory, source_run, _ = resolve_checkpoint(reference, tracking_uri, download_dir)
        meta = read_meta(directory)
    except CheckpointError as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ConfigError(f"train.init_from: checkpoint has no {STATE_FILE}: {directory}")
    step = meta.get("step")
    objective = str(meta.get("config", {}).get("objective", {}).get("name", ""))
    return InitSource(
        directory,
        meta.get("mlflow_run_id") or source_run,
        file_sha256(state_path),
        None if step is None else int(step),
        objective,
    )


def _grid(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError(f"train.init_from: {what} has {tokens} position embeddings, not a square patch grid")
    return side


def adapt_position_embedding(
    weights: dict[str, torch.Tensor], encoder: nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """Resample the checkpoint's `pos_embed` to the target ViT's patch grid (prefix tokens kept)."""
    from timm.layers import resample_abs_pos_embed

    old, new = weights.get("pos_embed"), getattr(encoder, "pos_embed", None)
    if old is None or new is None or old.shape == new.shape:
        return weights
    prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
    if old.shape[-1] != new.shape[-1]:
        raise ConfigError(
            f"train.init_from: {source} has embed_dim {old.shape[-1]}, this run's encoder {new.shape[-1]}"
        )
    old_grid = _grid(old.shape[1] - prefix, source)
    new_grid = list(encoder.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(
        old.float(), new_size=new_grid, old_size=[old_grid, old_grid], num_prefix_tokens=prefix
    )
    return {**weights, "pos_embed": resampled.to(old.dtype)}


def encoder_weights(source: InitSource, which: str) -> dict[str, torch.Tensor]:
    if which not in ("teacher", "student"):
        raise ConfigError(f"train.init_weights must be 'teacher' or 'student', got {which!r}")
    state = load_state(source.directory)
    try:
        return encoder_state(state, which)
    except KeyError as exc:
        raise ConfigError(f"train.init_from: {source.directory}: {exc.args[0]}") from None


def initialise_encoders(objective, source: InitSource, which: str = "teacher") -> int:
    """Load the source encoder into every distinct encoder of `objective`; returns how many."""
    weights = encoder_weights(source, which)
    targets = {id(e): e for e in objective.encoders().values() if e is not None}
    for encoder in targets.values():
        adapted = adapt_position_embedding(weights, encoder, source.directory)
        try:
            encoder.load_state_dict(adapted)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.init_from: the encoder in {source.directory} does not fit this run's model.encoder / "
                f"model.encoder_kwargs: {exc}"
            ) from None
    return len(targets)


def apply_init_from(objective, cfg: Config, resolved_dir: str | None = None) -> InitSource | None:
    """The loop's hook: initialise `objective` from `train.init_from` if set (no-op otherwise).

    `resolved_dir` is the driver's local copy; a worker that cannot see it (another node) resolves
    the reference itself.
    """
    reference = cfg.train.init_from
    if not reference:
        return None
    with tempfile.TemporaryDirectory(prefix="abpipe-init-") as tmp:
        if resolved_dir and os.path.isfile(os.path.join(resolved_dir, STATE_FILE)):
            source = resolve_init_source(resolved_dir, cfg.tracking.tracking_uri, tmp)
        else:
            source = resolve_init_source(reference, cfg.tracking.tracking_uri, tmp)
        initialise_encoders(objective, source, cfg.train.init_weights)
    return source
