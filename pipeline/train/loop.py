"""The per-worker training loop run by Ray Train's TorchTrainer (also runnable in-process).

One step: a batch of uint8 views (for AB: (B, M) crops + boxes and (B, A) annotation views) arrives
from the crop stage; the configured method (`objective.name`, see pipeline/objectives/registry.py)
computes its loss, AdamW steps, its teacher (if any) follows. The budget is
counted in seen views (every crop and annotation view counts once, summed over workers).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.checkpoints import load_state, read_meta, save_checkpoint
from pipeline.config import Config, config_from_dict
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import pooled_features
from pipeline.objectives.base import Objective, Progress
from pipeline.objectives.diagnostics import step_diagnostics
from pipeline.objectives.registry import build_objective
from pipeline.schedules import ema_rate, warmup_cosine
from pipeline.tracking import RunLogger

log = logging.getLogger("abpipe.train")


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive steps with a NaN/inf loss."""


@dataclass
class Budget:
    """Step arithmetic derived from the view budget, identical on every worker."""

    views_per_step: int
    total_steps: int
    warmup_steps: int

    @staticmethod
    def from_config(cfg: Config, world_size: int) -> "Budget":
        views_per_image = cfg.views.num_views + cfg.views.annotation_views + cfg.views.local_views
        per_step = cfg.train.batch_size * world_size * views_per_image
        total = max(1, math.ceil(cfg.train.total_views / per_step))
        return Budget(per_step, total, int(cfg.train.warmup_fraction * total))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, position embeddings and learned tokens (standard ViT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim <= 1
            or name.endswith(
                (
                    "pos_embed",
                    "cls_token",
                    "readout",
                    "corner_index",
                    "positional_embedding",
                    "logit_scale",
                    "mask_token",
                )
            )
            else decay
        ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _context():
    """(rank, world_size, in_ray_train) — the loop also runs outside Ray Train for tests/debugging."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), True
    except Exception:
        return 0, 1, False


def _all_finite(loss: torch.Tensor) -> bool:
    """Agree across workers: if any rank sees a bad loss, every rank skips the step together."""
    flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=loss.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _encoder_diagnostics(objective: Objective, batch: dict) -> dict[str, torch.Tensor]:
    """Pooled student-encoder features of the first view of the first image column (collapse watch)."""
    for column in objective.columns:
        images = batch.get(column)
        if images is not None and images.dtype == torch.uint8 and images.ndim == 5:
            encoder = objective.encoders()["student"]
            with torch.no_grad():
                x = images_to_float(images[:, 0])
                return {"encoder": pooled_features(encoder, x)}
    return {}


# Columns a decoupled annotation stream contributes to each batch (the rest come from the crop stream).
ANNOTATION_COLUMNS = ("ann_views", "tokens")


def _batches(shard, cfg: Config, device):
    """Full batches of a Ray Train dataset shard (or, in-process, any iterable of batch dicts)."""
    if not hasattr(shard, "iter_torch_batches"):
        return iter(shard)
    return iter(
        shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            device=device,
        )
    )


def _endless(make_iter):
    """Cycle through epochs of a stream; a stream that yields no batch at all is an error, not a hang."""
    while True:
        empty = True
        for item in make_iter():
            empty = False
            yield item
        if empty:
            raise RuntimeError(
                "the annotation stream yielded no full batch: check data.annotation_shards / data.annotation_mixture"
            )


def _grad_norms(model: torch.nn.Module) -> tuple[float, float]:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0, 0.0
    l2 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    linf = max(g.abs().max().item() for g in grads)
    return l2, linf


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    rank, world_size, in_ray = _context()
    torch.manual_seed(cfg.train.seed + rank)
    device = torch.device("cuda") if cfg.train.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if in_ray:
        import ray.train.torch as rtt

        device = rtt.get_device()
    if device.type == "cpu" and cfg.train.cpus_per_worker >= 1:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    budget = Budget.from_config(cfg, world_size)
    global_batch = cfg.train.batch_size * world_size
    peak_lr = cfg.train.lr * global_batch / 256

    objective = build_objective(cfg).to(device)  # seeded: identical initial weights on every worker
    if cfg.train.init_from and not loop_config.get("resume_from") and not (in_ray and ray.train.get_checkpoint()):
        from pipeline.train.init_from import apply_init_from  # MAWS stage: encoders from another run; heads stay fresh

        apply_init_from(objective, cfg, loop_config.get("init_from_dir"))
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.train.weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    torch.manual_seed(cfg.train.seed + 1000 + rank)

    step, views_seen, bad_streak, bad_total = 0, 0, 0, 0
    mlflow_run_id = loop_config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint() if in_ray else None
    resume_dir = loop_config.get("resume_from")
    if checkpoint is not None or resume_dir:
        with checkpoint.as_directory() if checkpoint is not None else nullcontext(resume_dir) as ckpt_dir:
            state = load_state(ckpt_dir, map_location=device)
            meta = read_meta(ckpt_dir)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        step, views_seen = int(meta["step"]), int(meta["views_seen"])
        bad_total = int(meta.get("bad_steps", 0))
        mlflow_run_id = meta.get("mlflow_run_id") or mlflow_run_id
        if rank == 0:
            print(f"[abpipe] resumed from step {step} ({views_seen:,} views seen)", flush=True)

    model = objective
    if in_ray and world_size > 1:
        import ray.train.torch as rtt

        model = rtt.prepare_model(
            objective,
            move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": objective.find_unused_parameters},
        )
    logger = RunLogger(cfg.tracking.tracking_uri, mlflow_run_id, enabled=rank == 0)

    def save(step: int, metrics: dict) -> None:
        """Every worker reports (Ray's report is a barrier); only rank 0 attaches the checkpoint."""
        meta = {
            "step": step,
            "views_seen": views_seen,
            "total_steps": budget.total_steps,
            "bad_steps": bad_total,
            "mlflow_run_id": mlflow_run_id,
            "config": cfg.to_dict(),
            "world_size": world_size,
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                encoders = objective.encoders()
                state = {
                    "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    # what eval loads, whatever the method: the bare ViT weights
                    "encoder_student": encoders["student"].state_dict(),
                    "encoder_teacher": encoders["teacher"].state_dict(),
                }
                save_checkpoint(tmp, state, meta)
                if cfg.tracking.log_checkpoints:
                    artifact = f"checkpoints/step_{step:08d}"
                    logger.artifact(os.path.join(tmp, "state.pt"), artifact)
                    logger.artifact(os.path.join(tmp, "meta.json"), artifact)
                    logger.tags({"abpipe.checkpoint_artifact": artifact})
                if in_ray:
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
            if in_ray:
                ray.train.report(
                    {**metrics, "step": step, "views_seen": views_seen},
                    checkpoint=ckpt,
                    checkpoint_dir_name=f"checkpoint_{step:08d}",
                )
            elif loop_config.get("local_checkpoint_dir") and rank == 0:
                save_checkpoint(
                    os.path.join(loop_config["local_checkpoint_dir"], f"checkpoint_{step:08d}"), state, meta
                )

    shard = ray.train.get_dataset_shard("train") if in_ray else loop_config["local_dataset"]
    annotations = None
    if cfg.data.decoupled:  # AB_{I1K+D}: annotation views come from their own stream, endlessly
        ann_shard = ray.train.get_dataset_shard("annotations") if in_ray else loop_config["local_annotations"]
        annotations = _endless(lambda: _batches(ann_shard, cfg, device))
    window_start, window_views = time.perf_counter(), 0
    last_metrics: dict = {}
    objective.train()
    while step < budget.total_steps:
        epoch_batches = 0
        for batch in _batches(shard, cfg, device):
            epoch_batches += 1
            if annotations is not None:
                batch = {**batch, **{k: v for k, v in next(annotations).items() if k in ANNOTATION_COLUMNS}}
            lr = warmup_cosine(step, budget.total_steps, budget.warmup_steps, peak_lr, cfg.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tau = ema_rate(
                step, budget.total_steps, cfg.objective.ema_start, cfg.objective.ema_end, cfg.objective.ema_horizon
            )
            logging_step = (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == budget.total_steps
            progress = Progress(step, budget.total_steps, tau, diagnose=logging_step and rank == 0)
            with autocast:
                out = model(batch, progress)
            optimizer.zero_grad(set_to_none=True)
            if not _all_finite(out.loss):
                bad_streak += 1
                bad_total += 1
                logger.metrics({"bad_steps": bad_total}, step)
                print(f"[abpipe] step {step}: non-finite loss, step skipped ({bad_streak} in a row)", flush=True)
                if bad_streak >= cfg.train.max_bad_steps:
                    logger.finish("FAILED")
                    raise NonFiniteLossError(
                        f"{bad_streak} consecutive non-finite losses at step {step}; stopping "
                        f"(lower train.lr or raise train.max_bad_steps; last good checkpoint is kept)"
                    )
                continue
            bad_streak = 0
            out.loss.backward()
            grad_l2, grad_linf = _grad_norms(objective)
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
            optimizer.step()
            objective.after_step(progress)
            step += 1
            views_seen += budget.views_per_step
            window_views += budget.views_per_step

            if logging_step:
                elapsed = time.perf_counter() - window_start
                terms = {k: float(v) for k, v in out.terms.items()}
                last_metrics = {
                    "loss": out.loss.item(),
                    **{f"loss_{k}": v for k, v in terms.items()},
                    **{k: float(v) for k, v in out.metrics.items()},
                    "lr": lr,
                    "ema_rate": tau,
                    "grad_norm_l2": grad_l2,
                    "grad_norm_linf": grad_linf,
                    "views_per_s": window_views / max(elapsed, 1e-9),
                    "views_seen": views_seen,
                }
                if rank == 0:
                    last_metrics.update(step_diagnostics({**out.diagnostics, **_encoder_diagnostics(objective, batch)}))
                logger.metrics(last_metrics, step)
                if rank == 0:
                    parts = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                    print(
                        f"[abpipe] step {step}/{budget.total_steps} views {views_seen:,} "
                        f"loss {last_metrics['loss']:.4f} ({parts}) "
                        f"lr {lr:.2e} ema {tau:.5f} {last_metrics['views_per_s']:.0f} views/s",
                        flush=True,
                    )
                window_start, window_views = time.perf_counter(), 0
            if step % cfg.train.checkpoint_every_steps == 0 and step < budget.total_steps:
                save(step, last_metrics)
            if step >= budget.total_steps:
                break
        if epoch_batches == 0:
            raise RuntimeError(
                "the training dataset yielded no full batch: check data.shards (is it empty, or every image skipped?) "
                f"and that train.batch_size={cfg.train.batch_size} is not larger than the per-worker data"
            )
    save(step, last_metrics)
    if rank == 0:
        logger.metrics({"final_step": step}, step)
