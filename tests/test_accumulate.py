"""`train.accum_steps`: a step over K sub-batches has the gradient of the whole batch, through the real TrainStep.

The reference is the same step with K = 1: one forward and one autograd backward over the whole batch (whose
losses the objective tests check against naive loop references). SimCLR, CLIP, AB_SimCLR and AB_CLIP
accumulate through cached embeddings (GradCache), MAE by plain accumulation; every parameter's gradient, the
loss, the logged terms and metrics and the EMA teacher after the update must match within 1e-5 (fp32; relative
for gradients above 1, see `max_grad_diff`). Then
the random state of the re-run (drop path), the config errors, autocast, and two gloo workers.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import Config, ConfigError, ObjectiveConfig, TrainConfig, ViewsConfig
from pipeline.objectives.base import Progress
from pipeline.objectives.registry import build_objective
from pipeline.train import accumulate
from pipeline.train.accumulate import check_accumulation
from pipeline.train.step import Budget, TrainStep, make_optimizer, peak_lr
from tests.micro import MICRO_MODEL
from tests.test_objectives_ssl import method_config
from tests.test_objectives_text import CONTEXT, text_config

CPU = torch.device("cpu")
B = 8  # images per worker: K = 2 and 4 cut it into 4 and 2 rows
TOL = 1e-5


def config(name: str, accum_steps: int = 1, model=None, **train) -> Config:
    if name in ("clip", "ab_clip"):
        cfg = text_config(name)
    elif name == "ab_simclr":
        cfg = Config(
            views=ViewsConfig(num_views=3, annotation_views=2, view_size=32),
            model=MICRO_MODEL,
            objective=ObjectiveConfig(name="ab_simclr"),
        )
    else:
        cfg = method_config(name)
    v = cfg.views
    per_step = B * (v.num_views + v.annotation_views + v.local_views)
    t = dict(total_views=10 * per_step, batch_size=B, warmup_fraction=0.0, grad_clip=0.0, precision="fp32")
    cfg = dataclasses.replace(cfg, train=TrainConfig(**{**t, **train, "accum_steps": accum_steps}))
    return dataclasses.replace(cfg, model=model) if model is not None else cfg


def make_batch(cfg: Config, seed: int, rows: int = B) -> dict[str, torch.Tensor]:
    """Every column any of these methods reads, for `rows` images (uint8 views, valid boxes, token ids)."""
    g = torch.Generator().manual_seed(seed)
    v, s = cfg.views, cfg.views.view_size
    lo = torch.rand(rows, max(v.num_views, 1), 2, generator=g) * 0.5
    batch = {
        "views": torch.randint(0, 256, (rows, max(v.num_views, 1), s, s, 3), dtype=torch.uint8, generator=g),
        "boxes": torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(lo.shape, generator=g)], dim=-1),
        "ann_views": torch.randint(0, 256, (rows, max(v.annotation_views, 1), s, s, 3), dtype=torch.uint8, generator=g),
        "tokens": torch.randint(1, 400, (rows, CONTEXT), generator=g),
    }
    return batch


def build(cfg: Config, model: torch.nn.Module | None = None):
    """(objective, TrainStep) from the same seed each time; an EMA teacher away from its student, as mid-run."""
    objective = build_objective(cfg)
    teacher = getattr(objective, "teacher", None)
    if teacher is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    objective.train()  # as the loop: teachers too are in train mode
    optimizer = make_optimizer(objective, peak_lr(cfg, 1), cfg.train.weight_decay)
    for group in optimizer.param_groups:
        # Attention's key bias has an exactly zero gradient, so only rounding noise (~1e-10), which AdamW's
        # default eps 1e-8 would turn into +-lr (a sign flip between two equal gradients); 1e-3 keeps it ~0 and
        # every real gradient's step at ~lr, so the weights after the update can be compared at 1e-5 too.
        group["eps"] = 1e-3
    return objective, TrainStep(cfg, objective, model or objective, optimizer, Budget.from_config(cfg, 1), CPU)


def run(cfg: Config, steps: int = 2) -> dict:
    """Each step's gradients, loss, terms, metrics and diagnostics, and the weights after the last update."""
    objective, step = build(cfg)
    record = []
    for i in range(steps):
        result = step(make_batch(cfg, seed=10 + i), i, logging=True, diagnose=True)
        assert result.found_inf.item() == 0
        out = result.out
        record.append(
            {
                "grads": {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
                "loss": out.loss.detach().clone(),
                "logged": {**out.terms, **out.metrics},
                "diagnostics": {k: torch.as_tensor(v).clone() for k, v in out.diagnostics.items()},
                "grad_norm": result.grad_norm.clone(),
            }
        )
    return {"steps": record, "state": {k: v.clone() for k, v in objective.state_dict().items()}}


def max_grad_diff(a: dict, b: dict) -> float:
    """Max |difference| over every parameter's gradient, each over max(1, its largest |gradient| in `a`): the
    absolute difference where gradients are at most 1, relative where larger (fp32 sums of gradients ~10, e.g.
    CLIP's after its logit scale of 14, round at ~1e-6 relative, whatever the order of the sums)."""
    assert a.keys() == b.keys(), "the same parameters must get gradients"
    return max(((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1.0)).item() for n in a)


def assert_same_steps(ref: dict, got: dict, tol: float = TOL) -> None:
    for r, g in zip(ref["steps"], got["steps"]):
        assert max(v.abs().max().item() for v in r["grads"].values()) > 1e-3, "a vacuous comparison"
        diff = max_grad_diff(r["grads"], g["grads"])
        assert diff < tol, f"max |grad difference| / max(1, |grad|) {diff:.2e}"
        assert g["loss"].item() == pytest.approx(r["loss"].item(), abs=tol)
        assert r["logged"].keys() == g["logged"].keys()
        for key, value in r["logged"].items():
            assert g["logged"][key].item() == pytest.approx(value.item(), abs=tol), key
        assert r["diagnostics"].keys() == g["diagnostics"].keys()
        for key, value in r["diagnostics"].items():
            assert torch.allclose(g["diagnostics"][key].float(), value.float(), atol=tol), key
        assert g["grad_norm"].item() == pytest.approx(r["grad_norm"].item(), rel=1e-5)
    assert ref["state"].keys() == got["state"].keys()
    for key, value in ref["state"].items():  # student, optimiser-moved weights, and the EMA teacher
        assert torch.allclose(got["state"][key].float(), value.float(), atol=tol, rtol=0), key


@pytest.mark.parametrize("name", ["simclr", "clip", "ab_simclr", "ab_clip", "mae"])
def test_accumulated_steps_have_the_whole_batch_gradient(name):
    ref = run(config(name, 1))
    ref_state = build(config(name, 1))[0].state_dict()
    assert any(not torch.equal(ref["state"][k], v) for k, v in ref_state.items()), "the steps must train"
    if name.startswith("ab_"):
        teacher = [k for k in ref_state if k.startswith("teacher.")]
        assert any(not torch.equal(ref["state"][k], ref_state[k]) for k in teacher), "the EMA teacher must move"
    for k in (2, 4):
        assert_same_steps(ref, run(config(name, k)))


def test_the_comparison_can_fail():
    """Plain accumulation (the mean of sub-batch gradients) is not a contrastive loss's whole-batch gradient."""
    ref = run(config("simclr", 1), steps=1)
    accumulate.MODES["simclr"] = accumulate.MEAN
    try:
        plain = run(config("simclr", 2), steps=1)
    finally:
        accumulate.MODES["simclr"] = accumulate.CACHED
    assert max_grad_diff(ref["steps"][0]["grads"], plain["steps"][0]["grads"]) > 100 * TOL


DROP_PATH_MODEL = dataclasses.replace(
    MICRO_MODEL, encoder_kwargs={**MICRO_MODEL.encoder_kwargs, "depth": 2, "drop_path_rate": 0.5}
)


def _drop_path_reference(cfg: Config, batch: dict, seed: int) -> tuple[dict, torch.Tensor]:
    """The whole batch's gradient with the masks the accumulated step draws: each sub-batch's student pass
    (with gradient) and teacher pass in the step's order from the same seed, one loss, one backward."""
    objective, _ = build(cfg)
    progress = Progress(0, 10)
    subs, _ = accumulate.split_batch(batch, cfg.train.accum_steps)
    torch.manual_seed(seed)
    parts, targets = [], []
    for sub in subs:
        parts.append(objective.embeddings(sub, progress))
        with torch.no_grad():
            targets.append(objective.targets(sub, progress))
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = objective.embedding_loss(batch, cat, {k: torch.cat([t[k] for t in targets]) for k in targets[0]}, progress)
    out.loss.backward()
    return {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}, out.loss.detach()


def _drop_path_step(cfg: Config, batch: dict, seed: int) -> tuple[dict, torch.Tensor]:
    objective, step = build(cfg)
    torch.manual_seed(seed)
    result = step(batch, 0, logging=False, diagnose=False)
    return {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}, result.out.loss.detach()


def test_the_rerun_replays_the_random_state(monkeypatch):
    """With drop path (student and, in train mode, teacher), the re-run must draw the first pass's masks."""
    cfg = config("ab_simclr", 2, model=DROP_PATH_MODEL)
    batch = make_batch(cfg, seed=3)
    ref_grads, ref_loss = _drop_path_reference(cfg, batch, seed=7)
    grads, loss = _drop_path_step(cfg, batch, seed=7)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TOL)
    assert max_grad_diff(ref_grads, grads) < TOL
    other_grads, _ = _drop_path_reference(cfg, batch, seed=8)
    assert max_grad_diff(ref_grads, other_grads) > 100 * TOL, "drop path must change the gradient"
    monkeypatch.setattr(accumulate, "replay_rng", lambda state: nullcontext())
    unreplayed, unreplayed_loss = _drop_path_step(cfg, batch, seed=7)
    assert unreplayed_loss.item() == pytest.approx(ref_loss.item(), abs=TOL)  # the first pass is unchanged
    assert max_grad_diff(ref_grads, unreplayed) > 100 * TOL, "a re-run with fresh masks must be caught"


def test_an_indivisible_batch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.batch_size=8 must be divisible by train\.accum_steps=3"):
        build(config("ab_simclr", 3))
    with pytest.raises(ConfigError, match=r"train\.accum_steps must be >= 1"):
        build(config("ab_simclr", 0))


@pytest.mark.parametrize("name", ["dino", "slip", "silc"])
def test_methods_without_exact_accumulation_are_refused(name):
    cfg = text_config(name) if name == "slip" else method_config(name)
    assert check_accumulation(dataclasses.replace(cfg, train=TrainConfig(batch_size=B))) is None  # K = 1: fine
    with pytest.raises(ConfigError, match=rf"train\.accum_steps=2 is not supported for objective\.name='{name}': "):
        check_accumulation(dataclasses.replace(cfg, train=TrainConfig(batch_size=B, accum_steps=2)))


def test_modes_cover_every_registered_method():
    from pipeline.objectives.registry import OBJECTIVES

    assert set(accumulate.MODES) | set(accumulate.UNSUPPORTED) == set(OBJECTIVES)
    assert not set(accumulate.MODES) & set(accumulate.UNSUPPORTED)


def test_bf16_autocast_accumulates_near_the_whole_batch():
    ref = run(config("ab_clip", 1, precision="bf16"), steps=1)["steps"][0]
    got = run(config("ab_clip", 2, precision="bf16"), steps=1)["steps"][0]
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    a = torch.cat([g.flatten() for g in ref["grads"].values()])
    b = torch.cat([got["grads"][n].flatten() for n in ref["grads"]])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.98


# -- two gloo workers ------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = config("ab_clip", 2)
    objective, step = build(cfg)
    step.model = torch.nn.parallel.DistributedDataParallel(objective)  # as the loop: its hooks must stay idle
    full = make_batch(cfg, seed=5, rows=B * world)
    batch = {k: v[rank * B : (rank + 1) * B] for k, v in full.items()}
    result = step(batch, 0, logging=False, diagnose=False)
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, result.out.loss.detach().view(1))
    torch.save({"loss": torch.cat(losses).mean(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.ray  # two spawned processes in a gloo process group: the full tier
@pytest.mark.timeout(600)
def test_two_gloo_workers_accumulate_to_the_single_process_gradient(tmp_path):
    """Each worker cuts its 8 rows into 2 sub-batches; the cached loss gathers all 16 rows' embeddings with
    gradients; the step averages the gradients (logit scale included) over the workers, outside DDP."""
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    cfg = config("ab_clip", 1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2 * B))
    objective, step = build(cfg)
    result = step(make_batch(cfg, seed=5, rows=2 * B), 0, logging=False, diagnose=False)
    ref = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"].item() == pytest.approx(result.out.loss.item(), abs=TOL)
        assert max_grad_diff(ref, got["grads"]) < TOL
        assert got["grads"]["student.log_scale"].abs().item() > 0
