"""The training loop, built from parts: restore -> (step -> log -> checkpoint) until the budget is spent.

One step: a batch of uint8 views (for AB: (B, M) crops + boxes and (B, A) annotation views) arrives
from the crop stage; the configured method (`objective.name`, see pipeline/objectives/registry.py)
computes its loss, AdamW steps, its teacher (if any) follows. The budget is counted in seen views
(every crop and annotation view counts once, summed over workers).

The parts, each in its own module: where the loop runs (`session.Session`: a Ray Train worker,
`distributed.RaySession`, or this process, `session.LocalSession`), the update (`step.TrainStep`),
what is logged (`monitor.Monitor`), the checkpoints (`checkpointing`) and the data stream with
what each pass has trained on (`stream`: an exact resume mid-pass). `train_loop_per_worker` is
what Ray Train's TorchTrainer runs; `train` is the loop itself, for any session.
"""

from __future__ import annotations

import contextlib
import time

import torch

from pipeline.config import Config, config_from_dict
from pipeline.console import StepReporter
from pipeline.objectives.registry import build_objective
from pipeline.tracking import RunLogger
from pipeline.train.checkpointing import Checkpointer, Counters, restore
from pipeline.train.flops import count_flops
from pipeline.train.monitor import Monitor
from pipeline.train.online_probe import OnlineProbe
from pipeline.train.session import Session
from pipeline.train.step import Budget, TrainStep, make_optimizer, peak_lr
from pipeline.train.stream import KeyLog, batches, restore_stream, resume_state, take_place

__all__ = ["train", "train_loop_per_worker"]


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point: `{"config", "mlflow_run_id", "init_from_dir", "progress", "resume_from"}` from
    the driver."""
    from pipeline.train.distributed import RaySession

    cfg = config_from_dict(loop_config["config"])
    train(
        cfg,
        RaySession(loop_config.get("resume_from")),
        loop_config.get("mlflow_run_id"),
        loop_config.get("init_from_dir"),
        progress=loop_config.get("progress"),
    )


def start(cfg: Config, session: Session, device: torch.device, init_from_dir: str | None, reporter: StepReporter):
    """(objective, optimiser, counters, the stream's resume state): restored from the session's
    checkpoint, else fresh (MAWS: from `train.init_from`). Seeded per rank; DDP then starts every worker
    from rank 0's weights, and a resumed worker continues its own saved random stream (stream.py)."""
    torch.manual_seed(cfg.train.seed + session.rank)
    objective = build_objective(cfg).to(device)
    with session.restored_checkpoint() as checkpoint_dir:
        if checkpoint_dir is None and cfg.train.init_from:
            # MAWS stage: encoders from another run; heads stay fresh
            from pipeline.train.init_from import apply_init_from

            apply_init_from(objective, cfg, init_from_dir)
        optimizer = make_optimizer(objective, peak_lr(cfg, session.world_size), cfg.train.weight_decay)
        torch.manual_seed(cfg.train.seed + 1000 + session.rank)
        if checkpoint_dir is None:
            return objective, optimizer, Counters(), None
        counters, resume = restore(checkpoint_dir, objective, optimizer, device)
    reporter.note(f"resumed from step {counters.step} ({counters.views_seen:,} views seen)")
    return objective, optimizer, counters, resume


def train(
    cfg: Config,
    session: Session,
    mlflow_run_id: str | None = None,
    init_from_dir: str | None = None,
    progress: str | None = None,
) -> dict:
    """Run the loop on `session` until `train.total_views` are seen; returns the last logged metrics.

    `mlflow_run_id` is the run the driver created (or found in the run's record) for this training run;
    `init_from_dir` is the driver's local copy of `train.init_from` (MAWS staging); `progress` names the
    driver's progress board (pipeline.console), which rank 0 feeds; without one, the lines are notes.
    """
    rank, device = session.rank, session.device(cfg.train.use_gpu)
    if device.type == "cpu" and (cfg.train.threads_per_worker or cfg.train.cpus_per_worker >= 1):
        torch.set_num_threads(cfg.train.threads_per_worker or int(cfg.train.cpus_per_worker))
    budget = Budget.from_config(cfg, session.world_size)
    reporter = StepReporter(progress, rank, budget.total_steps)  # the driver's bar + notes
    objective, optimizer, counters, resume = start(cfg, session, device, init_from_dir, reporter)
    ledgers = restore_stream(cfg, session, resume)  # what each pass has trained on, for an exact resume
    keys = KeyLog(cfg.train.key_log, rank)
    step = TrainStep(
        cfg, objective, session.prepare_model(objective, objective.find_unused_parameters), optimizer, budget, device
    )
    logger = RunLogger(cfg.tracking.tracking_uri, mlflow_run_id, enabled=rank == 0)
    monitor = Monitor(cfg, budget.total_steps, rank, logger, device, reporter)
    checkpointer = Checkpointer(cfg, session, objective, optimizer, logger, mlflow_run_id, budget.total_steps)
    probe = OnlineProbe(cfg, budget.total_steps, device) if rank == 0 and cfg.train.online_probe.root else None
    online: dict[str, float] = {}  # the last online-probe figures (opt-in), carried into the final report
    # training FLOPs of one step (all workers), counted on rank 0's first step of the run (kept by checkpoints)
    flops: float | None = counters.flops_per_step
    session_start, train_s_before = time.perf_counter(), counters.train_s

    objective.train()
    # closed when the loop ends (a break at the budget, or an error): the Ray Data iterators under it shut their
    # executors down now, not whenever the generator is collected (in the driver: in another Ray session)
    stream = batches(session, cfg, device, ledgers) if counters.step < budget.total_steps else iter(())
    with contextlib.closing(stream) if hasattr(stream, "close") else contextlib.nullcontext():
        for batch in stream:
            place = take_place(batch)  # (pass, row) of each row: recorded by the stream, not the model's
            logging = monitor.is_logging_step(counters.step)
            if flops is None and rank == 0:  # the first step of this process, counted once (train/flops.py)
                with count_flops() as counted:
                    result = step(batch, counters.step, logging=logging, diagnose=logging and rank == 0)
                flops = counted.total * session.world_size  # every worker runs the same shapes
                counters.flops_per_step = flops
                logger.metrics({"flops_per_step": flops}, counters.step + 1)
            else:
                result = step(batch, counters.step, logging=logging, diagnose=logging and rank == 0)
            counters.step += 1
            counters.views_seen += budget.views_per_step
            keys.write(counters.step, place, ledgers)
            monitor.after_step(result, budget.views_per_step)
            checkpoint = checkpointer.due(counters.step)
            if logging or checkpoint:
                monitor.check(counters)  # skipped steps: reported, and too many in a row stop the run
            if logging:
                monitor.log(counters, result, objective, batch)
            if probe is not None and probe.due(counters.step):
                online = probe(objective.encoders()["student"])
                logger.metrics(online, counters.step)
            # rank 0's step to the driver's bar (the loss only on logging steps: no host sync)
            reporter.step(counters.step, counters.views_seen, monitor.last_metrics if logging else None)
            counters.train_s = train_s_before + time.perf_counter() - session_start
            if checkpoint:
                checkpointer.save(counters, monitor.last_metrics, resume_state(session, ledgers))
            if counters.step >= budget.total_steps:
                break
    monitor.check(counters)
    if rank == 0:
        logger.metrics({"final_step": counters.step}, counters.step)
    # Deliver what a tracking outage held back before the last report, which carries the tally.
    unlogged = logger.close()
    tally = {"mlflow_failed_calls": logger.failures, "mlflow_unlogged_points": unlogged}
    dropped = sum(ledger.dropped for ledger in ledgers.values())
    tally.update({"resume_dropped_rows": dropped} if dropped else {})
    tally.update({"flops_per_step": flops} if flops is not None else {})
    tally["train_s"] = counters.train_s  # the loop's seconds over every session of the run (resumes included)
    checkpointer.save(counters, {**monitor.last_metrics, **online, **tally}, resume_state(session, ledgers))
    return {**monitor.last_metrics, **online}
