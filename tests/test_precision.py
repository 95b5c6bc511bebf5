"""`train.precision` (auto | bf16 | fp16 | fp32) and `train.compile` in the train step, on the CPU.

fp16 adds a GradScaler: an overflowing step must be skipped on the device and reported in the step's
`found_inf`, the flag the loop counts bad steps with, like any other non-finite step.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.objectives.registry import build_objective
from pipeline.train.step import Budget, TrainStep, make_optimizer, peak_lr
from tests.test_train import _batch, micro_config
from tests.test_train_loop import GOOD_BOXES, _same, _snapshot

CPU = torch.device("cpu")


def _step(tmp_path, **train):
    """A micro AB_SimCLR objective, its fused AdamW and the TrainStep, built from the same seed each time."""
    cfg = micro_config(tmp_path, tmp_path, steps=10)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    torch.manual_seed(0)
    objective = build_objective(cfg)
    optimizer = make_optimizer(objective, peak_lr(cfg, 1), cfg.train.weight_decay)
    return objective, optimizer, TrainStep(cfg, objective, objective, optimizer, Budget.from_config(cfg, 1), CPU)


def _losses(tmp_path, steps: int = 3, **train) -> list[float]:
    _, _, step = _step(tmp_path, **train)
    if step.scaler is not None:  # fp16: torch's first scale (2^16) overflows this micro model's step 0 (and skips it)
        step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = []
    for i in range(steps):
        result = step(_batch(GOOD_BOXES), i, logging=False, diagnose=False)
        assert result.found_inf.item() == 0
        losses.append(result.out.loss.item())
    return losses


def test_the_switches_are_config_fields_logged_with_the_run(tmp_path):
    flat = micro_config(tmp_path, tmp_path, steps=1).flat()  # what tracking logs as the run's params
    assert flat["train.precision"] == "auto" and flat["train.compile"] is False


def test_fp32_and_auto_are_the_same_on_the_cpu(tmp_path):
    fp32 = _losses(tmp_path, precision="fp32")
    assert _losses(tmp_path, precision="auto") == fp32  # bit for bit: no autocast on the CPU either way
    assert fp32[0] != fp32[-1]  # the steps did train


def test_bf16_autocasts_on_the_cpu_too(tmp_path):
    fp32 = _losses(tmp_path, precision="fp32")
    bf16 = _losses(tmp_path, precision="bf16")
    assert bf16 != fp32, "bf16 must actually autocast on the CPU"
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_an_fp16_overflow_is_skipped_and_reported(tmp_path):
    objective, optimizer, step = _step(tmp_path, precision="fp16")
    assert isinstance(step.scaler, torch.amp.GradScaler) and step.scaler.is_enabled()
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow at first
    first = step(_batch(GOOD_BOXES), 0, logging=False, diagnose=False)
    assert first.found_inf.item() == 0 and torch.isfinite(first.out.loss)
    before = _snapshot(objective, optimizer)
    step.scaler.update(new_scale=1e30)  # the scaled loss overflows fp16 in the backward pass
    overflow = step(_batch(GOOD_BOXES), 1, logging=True, diagnose=False)
    assert overflow.found_inf.item() == 1, "the overflow must be counted as a skipped step"
    assert torch.isfinite(overflow.out.loss)  # the loss itself was fine: only the scaled gradients overflowed
    assert _same(_snapshot(objective, optimizer), before), "a skipped step must change nothing"
    assert step.scaler.get_scale() == pytest.approx(0.5e30)  # the scaler saw the overflow and backed off
    step.scaler.update(new_scale=2.0**8)
    good = step(_batch(GOOD_BOXES), 2, logging=False, diagnose=False)
    assert good.found_inf.item() == 0 and not _same(_snapshot(objective, optimizer), before)
    assert all(torch.isfinite(p).all() for p in objective.parameters())


def test_fp16_loss_is_near_fp32(tmp_path):
    assert _losses(tmp_path, precision="fp16") == pytest.approx(_losses(tmp_path, precision="fp32"), rel=2e-2)


@pytest.mark.parametrize("value", ["bfloat16", "FP16", ""])
def test_an_unknown_precision_is_a_config_error(tmp_path, value):
    with pytest.raises(ConfigError, match=rf"train\.precision: '{value}' is not one of auto, bf16, fp16, fp32"):
        _step(tmp_path, precision=value)


def _compiled_losses(tmp_path, monkeypatch, backend: str | None) -> tuple[list[float], int]:
    """Losses of 2 compiled steps (backend None: the default, inductor), and the graphs dynamo made."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    if backend is not None:
        compile_with = functools.partialmethod(torch.nn.Module.compile, backend=backend)
        monkeypatch.setattr(torch.nn.Module, "compile", compile_with)
    torch._dynamo.reset()
    counters.clear()
    losses = _losses(tmp_path, steps=2, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return losses, graphs


def test_compile_traces_the_blocks_and_matches_eager(tmp_path, monkeypatch):
    """Dynamo captures every block kind (encoder, action decoder; student grad and teacher no-grad passes)
    with AOT autograd, but without inductor's C++ build (about 2 minutes on a 2-core CPU host, which CI
    should not pay for torch's own backend: checked by hand, 4.118270 vs 4.118270 eager)."""
    _, _, eager_step = _step(tmp_path)
    assert not any(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl for m in eager_step.objective.modules())
    compiled, graphs = _compiled_losses(tmp_path, monkeypatch, "aot_eager")
    assert graphs >= 2, "the encoder's and the decoder's blocks must run compiled"
    assert compiled == pytest.approx(_losses(tmp_path, steps=2), rel=1e-4)
