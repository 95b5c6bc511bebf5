"""What a person and MLflow see of a run, read from the device only on logging and checkpoint steps.

Logging steps (every `train.log_every_steps`, and the last) read the step's loss, terms, metrics and
gradient norms in one host transfer, add the schedules, throughput and (rank 0) collapse diagnostics,
log them to MLflow and hand them to the console's StepReporter (one line per logging step). The
skipped-step counters live on the device; `check` reads them at logging and checkpoint steps, reports
new skips, and stops the run after `train.max_bad_steps` consecutive ones (a streak is therefore
noticed at the next such step, not at the step it reaches the limit).
"""

from __future__ import annotations

import time

import torch

from pipeline.config import Config
from pipeline.console import StepReporter
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import pooled_features
from pipeline.objectives.base import Objective
from pipeline.objectives.diagnostics import step_diagnostics
from pipeline.tracking import RunLogger
from pipeline.train.checkpointing import Counters
from pipeline.train.step import StepResult


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive steps with a NaN/inf loss or gradient."""


class BadSteps:
    """Device-side counters of skipped steps: the current streak and the total since the last check."""

    def __init__(self, device: torch.device):
        self.streak = torch.zeros((), device=device)
        self.new = torch.zeros((), device=device)

    def add(self, found_inf: torch.Tensor) -> None:
        self.streak.mul_(found_inf).add_(found_inf)  # +1 on a skipped step, back to 0 on a good one
        self.new.add_(found_inf)

    def read(self) -> tuple[int, int]:
        """(streak, skipped since the last read) on the host: one sync."""
        streak, new = torch.stack([self.streak, self.new]).tolist()
        self.new.zero_()
        return int(streak), int(new)


def encoder_diagnostics(objective: Objective, batch: dict) -> dict[str, torch.Tensor]:
    """Pooled student-encoder features of the first view of the first image column (collapse watch)."""
    for column in objective.columns:
        images = batch.get(column)
        if images is not None and images.dtype == torch.uint8 and images.ndim == 5:
            with torch.no_grad():
                return {"encoder": pooled_features(objective.encoders()["student"], images_to_float(images[:, 0]))}
    return {}


def _host_values(values: dict[str, object]) -> dict[str, float]:
    """Tensors and numbers as floats, the device tensors in one transfer."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([t.detach().float().reshape(()).to(device) for t in tensors.values()]).tolist()
        out.update(zip(tensors, stacked))
    return {k: out[k] for k in values}


class Monitor:
    def __init__(
        self,
        cfg: Config,
        total_steps: int,
        rank: int,
        logger: RunLogger,
        device: torch.device,
        reporter: StepReporter | None = None,
    ):
        self.cfg, self.total_steps, self.rank, self.logger = cfg, total_steps, rank, logger
        self.reporter = reporter or StepReporter(None, rank, total_steps)
        self.bad = BadSteps(device)
        self.last_metrics: dict = {}
        self.window_start, self.window_views = time.perf_counter(), 0

    def is_logging_step(self, step: int) -> bool:
        """Whether the step numbered `step` (0-based, before it runs) is logged."""
        return (step + 1) % self.cfg.train.log_every_steps == 0 or step + 1 == self.total_steps

    def after_step(self, result: StepResult, views: int) -> None:
        self.bad.add(result.found_inf)
        self.window_views += views

    def check(self, counters: Counters) -> None:
        """Read the skipped-step counters; raise NonFiniteLossError after too many in a row."""
        streak, new = self.bad.read()
        if not new:
            return
        counters.bad_steps += new
        self.logger.metrics({"bad_steps": counters.bad_steps}, counters.step)
        self.reporter.note(
            f"step {counters.step}: {new} non-finite step(s) skipped ({streak} in a row, {counters.bad_steps} in all)",
            warning=True,
        )
        if streak >= self.cfg.train.max_bad_steps:
            self.logger.finish("FAILED")
            raise NonFiniteLossError(
                f"{streak} consecutive non-finite losses at step {counters.step}; stopping "
                f"(lower train.lr or raise train.max_bad_steps; last good checkpoint is kept)"
            )

    def log(self, counters: Counters, result: StepResult, objective: Objective, batch: dict) -> None:
        out = result.out
        elapsed = time.perf_counter() - self.window_start
        values = {
            "loss": out.loss,
            **{f"loss_{k}": v for k, v in out.terms.items()},
            **out.metrics,
            "grad_norm_l2": result.grad_norm,
            "grad_norm_linf": result.grad_norm_linf if result.grad_norm_linf is not None else 0.0,
        }
        metrics = {
            **_host_values(values),
            "lr": result.lr,
            "ema_rate": result.ema_rate,
            "views_per_s": self.window_views / max(elapsed, 1e-9),
            "views_seen": counters.views_seen,
        }
        if self.rank == 0:
            metrics.update(step_diagnostics({**out.diagnostics, **encoder_diagnostics(objective, batch)}))
        self.logger.metrics(metrics, counters.step)
        self.last_metrics = metrics
        self.window_start, self.window_views = time.perf_counter(), 0
