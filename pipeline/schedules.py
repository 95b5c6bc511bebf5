"""Schedules as pure functions of the step: the learning rate (training and probes) and the EMA rate.

A shared service: the training loop and the eval probes' training both read them, so they live
below both (neither imports the other for a schedule).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to `floor` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_rate(step: int, total_steps: int, start: float = 0.004, end: float = 0.0) -> float:
    """EMA teacher rate tau: cosine from `start` at step 0 to `end` at `total_steps` (clamped after; DINO recipe)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
