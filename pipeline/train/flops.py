"""Training FLOPs of a step, counted by torch's own `FlopCounterMode` (matmuls, convolutions and attention,
forward and backward; element-wise work such as the optimiser's and the EMA update is not counted).

A run counts its first step (every step of a run has the same shapes) and reports `flops_per_step`;
the study multiplies it by the steps to put training compute next to each figure (docs/study.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Counted:
    total: float = 0.0  # FLOPs (a multiply-add counts 2), filled when the block ends


@contextmanager
def count_flops() -> Iterator[Counted]:
    """`with count_flops() as c: ...` -> `c.total`, the FLOPs torch dispatched inside the block."""
    counted = Counted()
    mode = FlopCounterMode(display=False)
    with mode:
        yield counted
    counted.total = float(mode.get_total_flops())
