"""EMA teacher: theta_t <- theta_t + tau (theta_s - theta_t); tau follows pipeline.schedules.ema_rate (DINO recipe)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float | torch.Tensor) -> None:
    """Move teacher weights a fraction `tau` towards the student; buffers are copied.

    `tau` may be a 0-d device tensor (the training loop passes 0 for a skipped step): then the update
    is sub/mul/add on the device, since `_foreach_lerp_` would read a tensor weight on the host.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if isinstance(tau, torch.Tensor):
        step = torch._foreach_sub(s_params, t_params)
        torch._foreach_mul_(step, tau)
        torch._foreach_add_(t_params, step)
    else:
        torch._foreach_lerp_(t_params, s_params, tau)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
