"""Table 4 ablation switches, the Fig. 3 crop-distance control, and the training diagnostics.

Each is checked against a direct computation: the ablated loss against the full step's terms, the
crop-distance control's marginal against i.i.d. sampling (KS test), RankMe and the IoU-binned error
against numpy / loop re-implementations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from pipeline.config import Config, ConfigError, ObjectiveConfig, ViewsConfig
from pipeline.data.pair_sampling import mean_pair_iou, select_boxes
from pipeline.data.views import sample_boxes
from pipeline.geometry import box_iou
from pipeline.metrics import rankme
from pipeline.objectives.ab_simclr import ab_simclr_step
from pipeline.objectives.base import Progress
from pipeline.objectives.diagnostics import embedding_std, iou_binned_error
from pipeline.objectives.registry import build_objective
from tests.micro import MICRO_MODEL
from tests.test_train import BATCH, A, M, _batch, micro_config


def _objective(**objective):
    cfg = Config(
        model=MICRO_MODEL,
        views=ViewsConfig(num_views=M, view_size=32, annotation_views=A),
        objective=ObjectiveConfig(**objective),
    )
    return build_objective(cfg)


def _boxes():
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(BATCH, M, 2, generator=g) * 0.4
    return torch.cat([lo, lo + 0.5], dim=-1)


def test_no_target_network_uses_the_student_as_its_own_teacher():
    ablated = _objective(teacher="student")
    assert ablated.teacher is None
    enc = ablated.encoders()
    assert enc["teacher"] is enc["student"]
    batch = _batch(_boxes())
    out = ablated(batch, Progress(0, 10, 0.004))
    ref = ab_simclr_step(
        ablated.student, ablated.student, batch["views"], batch["boxes"], batch["ann_views"], ablated.cfg.objective
    )
    assert torch.allclose(out.loss, ref.loss)
    before = [p.clone() for p in ablated.parameters()]
    ablated.after_step(Progress(0, 10, 0.5))  # no EMA to move
    assert all(torch.equal(a, b) for a, b in zip(before, ablated.parameters()))


@pytest.mark.parametrize(
    "weights, term", [({"propagation_weight": 0.0}, "annotation"), ({"annotation_weight": 0.0}, "propagation")]
)
def test_dropping_a_loss_leaves_exactly_the_other(weights, term):
    obj = _objective(**weights)
    out = obj(_batch(_boxes()), Progress(0, 10, 0.004))
    assert torch.allclose(out.loss, out.terms[term])


def test_bad_teacher_name_is_a_config_error():
    with pytest.raises(ConfigError, match="objective.teacher"):
        _objective(teacher="momentum")


# ---------------------------------------------------------------------------------------------
# Crop-distance control


def _draw(mode: str, n: int, seed: int = 0, m: int = 4, k: int = 4):
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(n):
        pool = sample_boxes(rng, 200, 300, m * k, (0.08, 1.0), (3 / 4, 4 / 3))
        chosen.append(select_boxes(pool, m, mode, rng))
    return np.stack(chosen)


def test_crop_distance_control_moves_pair_iou_but_not_the_box_marginal():
    # 200 images a mode (the near/far local search is the cost): the pair-IoU gaps stay ~0.16 / ~0.07 over
    # seeds (thresholds 0.1 / 0.03), and a crop chosen by a biased group rule still fails a KS test at p < 1e-15.
    n = 200
    iid, near, far = (_draw(mode, n, seed=i) for i, mode in enumerate(("iid", "near", "far")))
    pair_iou = {
        name: np.mean([mean_pair_iou(b) for b in draws]) for name, draws in (("iid", iid), ("near", near), ("far", far))
    }
    assert pair_iou["near"] > pair_iou["iid"] + 0.1 and pair_iou["far"] < pair_iou["iid"] - 0.03, pair_iou

    # One uniformly chosen crop per image is an independent draw from the crop marginal: it must
    # match i.i.d. sampling in area, aspect and position (KS tests at a strict level).
    def one_per_image(draws, seed):
        pick = np.random.default_rng(seed).integers(0, draws.shape[1], len(draws))
        b = draws[np.arange(len(draws)), pick]
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return {"area": w * h, "aspect": w / h, "cx": (b[:, 0] + b[:, 2]) / 2, "cy": (b[:, 1] + b[:, 3]) / 2}

    ref = one_per_image(_draw("iid", n, seed=10), 0)
    for draws in (near, far):
        got = one_per_image(draws, 1)
        for key in ref:
            assert stats.ks_2samp(ref[key], got[key]).pvalue > 1e-3, key


def test_crop_distance_control_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pair_sampling"):
        select_boxes(np.zeros((8, 4)), 4, "closest", np.random.default_rng(0))
    cfg = Config(model=MICRO_MODEL, views=ViewsConfig(num_views=M, view_size=32, pair_sampling="closest"))
    with pytest.raises(ConfigError, match="views.pair_sampling"):
        build_objective(cfg)  # refused at build time, never inside a crop actor


def test_make_views_applies_the_crop_distance_control():
    from pipeline.data.views import make_views

    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    means = {}
    for mode in ("near", "iid"):
        cfg = ViewsConfig(num_views=4, view_size=16, annotation_views=0, pair_sampling=mode)
        draws = [make_views(image, np.random.default_rng(s), cfg) for s in range(150)]
        assert all(d["boxes"].shape == (4, 4) and d["views"].shape == (4, 16, 16, 3) for d in draws)
        means[mode] = np.mean([mean_pair_iou(d["boxes"]) for d in draws])
    assert means["near"] > means["iid"] + 0.08, means


# ---------------------------------------------------------------------------------------------
# Diagnostics


def test_rankme_matches_numpy_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 16)) @ np.diag(np.linspace(1, 0.01, 16))
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(torch.tensor(z, dtype=torch.float32)) == pytest.approx(
        float(np.exp(-(p * np.log(p)).sum())), rel=1e-4
    )
    collapsed = torch.ones(32, 8) + 1e-6 * torch.randn(32, 8)
    assert rankme(collapsed) < 1.1 and embedding_std(collapsed) < 1e-4
    assert embedding_std(torch.randn(512, 16)) == pytest.approx(1 / 16**0.5, rel=0.1)


def test_iou_binned_error_matches_a_loop():
    rng = np.random.default_rng(0)
    err = rng.random((4, 3, 3))
    lo = rng.random((4, 3, 2)) * 0.5
    boxes = np.concatenate([lo, lo + 0.4], -1)
    iou = box_iou(boxes[:, :, None], boxes[:, None])
    got = iou_binned_error(torch.tensor(err), torch.tensor(iou))
    edges = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 1.0001)]
    for lo_e, hi_e in edges:
        vals = [e for e, i in zip(err.ravel(), iou.ravel()) if lo_e <= i < hi_e]
        name = f"{lo_e:.1f}-{min(hi_e, 1.0):.1f}"
        if vals:
            assert got[name] == pytest.approx(np.mean(vals))
        else:
            assert name not in got
    assert got["0.5-1.0"] >= 0  # the identity pairs (IoU 1) land in the last bin


def test_diagnostics_reach_mlflow_on_logged_steps(tmp_path):
    from pipeline.tracking import start_run
    from pipeline.train.loop import train
    from pipeline.train.session import LocalSession

    cfg = micro_config(tmp_path, tmp_path, steps=4, log_every_steps=2, checkpoint_every_steps=1000)
    run_id = start_run(cfg.tracking.tracking_uri, "unit", "diag", cfg.flat())
    train(cfg, LocalSession({"train": [_batch(_boxes())] * 4}, tmp_path / "ck"), run_id)
    metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(run_id).data.metrics
    for key in (
        "rankme_encoder",
        "std_encoder",
        "rankme_head",
        "std_head",
        "grad_norm_l2",
        "grad_norm_linf",
        "teacher_entropy",
    ):
        assert key in metrics, sorted(metrics)
    assert 1.0 <= metrics["rankme_encoder"] <= 48  # at most the micro ViT's width
    assert any(k.startswith("prop_error_iou_") for k in metrics), sorted(metrics)
    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(run_id, "rankme_encoder")
    assert sorted(m.step for m in history) == [2, 4]  # only on logged steps
