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


def ema_start_for_run(start: float, total_steps: int, horizon: float) -> float:
    """The EMA rate at step 0 for a run of `total_steps`: `start`, raised for short runs so that the
    teacher's averaging horizon (1/tau steps) is at most `horizon` of the run (0 = `start` as given).

    The AB paper's 0.004 (DINO's 0.996 momentum) is a ~250-step horizon, a sliver of its 800M-view runs;
    in a 300-step run it is most of the run, the teacher stays near its random init and its targets stay
    uniform (measured: teacher entropy 3.95 of log 64 = 4.16 at step 300, propagation loss not falling).
    With horizon 1/15 a 300-step run starts at 0.05; any run of >= 3,750 steps keeps the paper's 0.004.
    """
    if horizon <= 0:
        return start
    return min(1.0, max(start, 1.0 / (horizon * max(total_steps, 1))))


def ema_rate(step: int, total_steps: int, start: float = 0.004, end: float = 0.0, horizon: float = 0.0) -> float:
    """EMA teacher rate tau: cosine from the step-0 rate (`ema_start_for_run`) to `end` at `total_steps`
    (clamped after; DINO recipe)."""
    start = ema_start_for_run(start, total_steps, horizon)
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
