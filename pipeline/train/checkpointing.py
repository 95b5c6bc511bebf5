"""The loop's checkpoints: what a run restores from, and what it writes and reports.

A checkpoint holds the objective and optimiser state, the bare encoder weights eval reads, and in its
meta the counters (step, views seen, skipped steps) plus, as provenance for eval (checkpoint keys,
lineage), the MLflow run id the driver chose once. The loop never reads that id back: a resumed run
gets it from the driver, which keeps it in the run's record (pipeline/checkpoints.py `run_record`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from pipeline.checkpoints import META_FILE, STATE_FILE, load_state, read_meta, save_checkpoint
from pipeline.config import Config
from pipeline.objectives.base import Objective
from pipeline.tracking import RunLogger, redact
from pipeline.train.session import Session


@dataclass
class Counters:
    """Where the run is, on the host: the step, views seen and skipped steps up to the last check, and what
    the run's cost figures need across restarts: seconds spent in the training loop (all sessions) and the
    FLOPs of one step (counted on the run's first step)."""

    step: int = 0
    views_seen: int = 0
    bad_steps: int = 0
    train_s: float = 0.0
    flops_per_step: float | None = None


def restore(
    directory: str, objective: Objective, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[Counters, dict | None]:
    """Load a checkpoint's objective and optimiser state; its counters say where to go on from, its
    resume state where in the data stream (None in checkpoints written before it was kept)."""
    state = load_state(directory, map_location=device)
    meta = read_meta(directory)
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    keep_fused(optimizer)
    flops = meta.get("flops_per_step")
    counters = Counters(
        int(meta["step"]),
        int(meta["views_seen"]),
        int(meta.get("bad_steps", 0)),
        float(meta.get("train_s", 0.0)),
        None if flops is None else float(flops),
    )
    return counters, state.get("resume")


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """Loaded state brings the saved param groups' `fused` flag (None in checkpoints written by the
    foreach AdamW this loop used before); keep the optimiser's own, which the device-side skip needs,
    with step counts on the parameters' device as the fused kernel wants them."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        group["fused"] = fused
    if fused:
        for param, state in optimizer.state.items():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


class Checkpointer:
    """Writes a checkpoint on rank 0, logs it to MLflow when asked, and reports it through the session.

    Every worker calls `save` at the same steps: the session's report is a barrier.
    """

    def __init__(
        self,
        cfg: Config,
        session: Session,
        objective: Objective,
        optimizer,
        logger: RunLogger,
        mlflow_run_id: str | None,
        total_steps: int,
    ):
        self.cfg, self.session, self.objective, self.optimizer = cfg, session, objective, optimizer
        self.logger, self.mlflow_run_id, self.total_steps = logger, mlflow_run_id, total_steps

    def due(self, step: int) -> bool:
        """A periodic checkpoint (the final one is written after the loop)."""
        return step % self.every == 0 and step < self.total_steps

    @property
    def every(self) -> int:
        """Steps between periodic checkpoints: `train.checkpoint_fraction` of the run when set."""
        fraction = self.cfg.train.checkpoint_fraction
        if fraction > 0:
            return max(1, round(self.total_steps * fraction))
        return self.cfg.train.checkpoint_every_steps

    def meta(self, counters: Counters) -> dict:
        return {
            "step": counters.step,
            "views_seen": counters.views_seen,
            "total_steps": self.total_steps,
            "bad_steps": counters.bad_steps,
            "train_s": round(counters.train_s, 3),
            "flops_per_step": counters.flops_per_step,
            "mlflow_run_id": self.mlflow_run_id,
            "config": redact(self.cfg.to_dict()),  # no user:password@ of a URI in a checkpoint
            "world_size": self.session.world_size,
        }

    def state(self, resume: dict | None = None) -> dict:
        encoders = self.objective.encoders()
        return {
            "resume": resume,  # the data stream's place and the workers' RNG states (train/stream.py)
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # what eval loads, whatever the method: the bare ViT weights
            "encoder_student": encoders["student"].state_dict(),
            "encoder_teacher": encoders["teacher"].state_dict(),
        }

    def save(self, counters: Counters, metrics: dict, resume: dict | None = None) -> None:
        name = f"checkpoint_{counters.step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            if self.session.rank == 0:
                directory = str(save_checkpoint(tmp, self.state(resume), self.meta(counters)))
                if self.cfg.tracking.log_checkpoints:
                    artifact = f"checkpoints/step_{counters.step:08d}"
                    self.logger.artifact(os.path.join(tmp, STATE_FILE), artifact)
                    self.logger.artifact(os.path.join(tmp, META_FILE), artifact)
                    self.logger.tags({"abpipe.checkpoint_artifact": artifact})
            report = {**metrics, "step": counters.step, "views_seen": counters.views_seen}
            self.session.report(report, directory, name)
