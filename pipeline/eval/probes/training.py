"""The one training loop of the trained probes (attentive, decoder): same optimiser, schedule and
budget for every method and task, so probe numbers differ only by the frozen features.

AdamW, linear warmup then cosine to 0 (pipeline.schedules), gradient clipping, a fixed
number of steps over seeded random mini-batches drawn without replacement per pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.config import EvalConfig, ProbeConfig
from pipeline.schedules import warmup_cosine


def probe_device(cfg: EvalConfig) -> torch.device:
    return torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index arrays over range(n): seeded shuffled passes, each row once per pass."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + min(batch_size, n) > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_probe(
    model: torch.nn.Module, loss_fn: Callable[[np.ndarray], torch.Tensor], n: int, pc: ProbeConfig, seed: int
) -> list[float]:
    """Run `pc.steps` steps of `loss_fn(batch row indices)`; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms, biases, embeddings' scale
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": pc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=pc.lr
    )
    warmup = int(pc.warmup_fraction * pc.steps)
    losses = []
    model.train()
    with torch.enable_grad():
        for step, idx in enumerate(batches(n, pc.batch_size, pc.steps, seed)):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, pc.steps, warmup, pc.lr, 0.0)
            loss = loss_fn(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"probe loss became {loss.item()} at step {step}; lower eval.probe.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if pc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, pc.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def as_float_tensor(array: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows `idx` of a (possibly float16) numpy array as float32 on `device`."""
    return torch.as_tensor(np.asarray(array[idx]), dtype=torch.float32, device=device)
