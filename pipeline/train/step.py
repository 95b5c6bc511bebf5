"""One optimisation step, written so that a GPU never waits on the host.

A step is: schedules -> forward (the objective's loss) -> backward -> gradient norm (and clipping) ->
AdamW -> the objective's after-step (EMA teachers). Nothing in it reads a device value on the host:
- the non-finite check is a device flag, `found_inf` = the loss or the total gradient norm is not finite
  (agreed across workers). The skip is done on the device too: the fused AdamW kernel skips its update
  when `found_inf` is set (the protocol torch's AMP GradScaler uses for fused optimizers: attributes
  `grad_scale` / `found_inf` set around `step()`, step counts restored), and the EMA rate is multiplied
  by `1 - found_inf`, so a skipped step changes neither the student, the optimiser state nor the teacher;
- gradient norms are device tensors; the l-inf norm is computed only on logging steps;
- the bad-step counters stay on the device; the loop reads them at logging and checkpoint steps only.
A skipped step still counts as a step of the budget: its views were seen.

`train.precision` picks the autocast (auto: bf16 on CUDA, fp32 on CPU; bf16; fp16; fp32). fp16 adds a
GradScaler: the loss is scaled for the backward pass, the gradients unscaled before the norm and clipping, so an
overflow shows as a non-finite norm and is skipped (and counted) like any other bad step; the scaler then lowers
its scale. `train.compile` compiles the objective's transformer blocks in place (`compile_blocks`).
`train.accum_steps` > 1 runs the forward and backward over that many sub-batches of the batch, with the whole
batch's gradient (pipeline/train/accumulate.py); the norm, clipping, skip and update then run once, as here.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.config import Config, ConfigError
from pipeline.objectives.base import Objective, Progress, StepOutput
from pipeline.schedules import ema_rate, warmup_cosine
from pipeline.train.accumulate import CACHED, average_gradients, cached_step, check_accumulation, mean_step
from pipeline.train.distributed import any_worker

NO_DECAY_SUFFIXES = (
    "pos_embed",
    "cls_token",
    "readout",
    "corner_index",
    "positional_embedding",
    "logit_scale",
    "mask_token",
)


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
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: Config, world_size: int) -> float:
    """`train.lr` is per 256 images of the global batch (linear scaling rule)."""
    return cfg.train.lr * cfg.train.batch_size * world_size / 256


def make_optimizer(objective: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for the device (CUDA, CPU): it can skip on device."""
    groups = param_groups(objective, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel: foreach, skipped via the host
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()` unless `found_inf` (a 0-d float device tensor) is 1.

    A fused optimizer takes the flag and skips on the device; any other needs it on the host (a sync).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()


PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `train.precision` asks for on `device`; None: no autocast (fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return PRECISIONS[precision]


def transformer_blocks(objective: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of every encoder and decoder in `objective` (students and teachers):
    timm's ViT blocks (encoders, MAE's decoder), the action decoder's layers, open_clip's text blocks."""
    from timm.models.vision_transformer import Block

    from pipeline.models.decoder import DecoderLayer

    kinds: tuple[type, ...] = (Block, DecoderLayer)
    try:
        from open_clip.transformer import ResidualAttentionBlock

        kinds += (ResidualAttentionBlock,)
    except ImportError:  # pragma: no cover - open_clip is a dependency; without it there is no text tower
        pass
    return [m for m in objective.modules() if isinstance(m, kinds)]


def compile_blocks(objective: torch.nn.Module) -> int:
    """`torch.compile` each transformer block of `objective` in place (`nn.Module.compile`); returns how many.

    Regional compilation: the blocks are where the time goes, every block of a kind shares its compiled code
    (recompiled once for new shapes and for the EMA teacher's no-grad pass), and it works whatever calls the
    blocks (`forward_features`, MAE's visible-token pass, DINO's crops of two sizes). Parameter names, hence
    checkpoints and state dicts, are unchanged.
    """
    blocks = transformer_blocks(objective)
    for block in blocks:
        block.compile()
    return len(blocks)


@dataclass
class StepResult:
    """A step's outputs, all on the device: read them on the host only on logging steps."""

    out: StepOutput
    lr: float
    ema_rate: float
    grad_norm: torch.Tensor  # l2 norm of all gradients, before clipping
    grad_norm_linf: torch.Tensor | None  # logging steps only
    found_inf: torch.Tensor  # 1.0 when this step was skipped


class TrainStep:
    """Schedules, optimiser and the update of one step for `objective` (`model` may be its DDP wrapper)."""

    def __init__(
        self, cfg: Config, objective: Objective, model: torch.nn.Module, optimizer, budget: Budget, device: torch.device
    ):
        self.cfg, self.objective, self.model, self.optimizer, self.budget = cfg, objective, model, optimizer, budget
        self.device = device
        self.accumulation = check_accumulation(cfg)  # None (accum_steps 1), CACHED or MEAN; ConfigError if it cannot
        self.peak_lr = optimizer.defaults["lr"]
        self.params = [p for p in objective.parameters() if p.requires_grad]
        dtype = autocast_dtype(cfg.train.precision, device)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        # fp16: the loss is scaled for the backward pass (bf16 has fp32's range and needs no scaler)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        if cfg.train.compile:
            compile_blocks(objective)

    def schedules(self, step: int) -> tuple[float, float]:
        """(learning rate, EMA rate) at `step`."""
        t = self.cfg.train
        lr = warmup_cosine(step, self.budget.total_steps, self.budget.warmup_steps, self.peak_lr, t.min_lr)
        ob = self.cfg.objective
        return lr, ema_rate(step, self.budget.total_steps, ob.ema_start, ob.ema_end, ob.ema_horizon)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, the loss scaled first under fp16 (unscaled once, after every backward of the step)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def __call__(self, batch: dict, step: int, logging: bool, diagnose: bool) -> StepResult:
        lr, tau = self.schedules(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        progress = Progress(step, self.budget.total_steps, tau, diagnose=diagnose)
        if self.accumulation is None:
            with self.autocast:
                out = self.model(batch, progress)
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(out.loss)
        else:  # K sub-batches on the objective itself (not its DDP wrapper), then one average over the workers
            self.optimizer.zero_grad(set_to_none=True)
            k = self.cfg.train.accum_steps
            if self.accumulation == CACHED:
                out = cached_step(self.objective, batch, progress, k, self.autocast, self.backward, self.device)
            else:
                out = mean_step(self.objective, batch, progress, k, self.autocast, self.backward)
            average_gradients(self.params)
        if self.scaler is not None:  # an overflow leaves inf/NaN gradients after unscale_: a non-finite norm
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        linf = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) if logging and grads else None
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=out.loss.device)
        found_inf = any_worker((~(torch.isfinite(out.loss.detach()) & torch.isfinite(norm))).float())
        # With a scaler this is what scaler.step does for the fused AdamW (unscaled grads: grad_scale None, the
        # device flag), with the loss and every worker in the flag; the scaler's update lowers the scale on overflow.
        step_unless(self.optimizer, found_inf)
        if self.scaler is not None:
            self.scaler.update()
        self.objective.after_step(dataclasses.replace(progress, ema_rate=tau * (1.0 - found_inf)))
        return StepResult(out, lr, tau, norm.detach(), linf, found_inf)
