"""The curves study (issue 26): the dense scene preset, the budget arms, the per-run costs, and the gap's trend fit.

The dense preset's scenes are checked in pycocotools; the trend fit against numpy's own least squares on
synthetic rows whose slope is known; the FLOP counter against a hand count of a linear layer's matmuls.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ScenesConfig, load_config, parse_overrides
from pipeline.study import (
    ARMS,
    DEFAULT_CONFIG,
    PRESETS,
    arm_config,
    default_arms,
    preset_overrides,
    results_file,
    scaled_views,
)
from pipeline.study_curves import BUDGET_PAIRS, cost_table, curves_report, fit_trend, gap_points, trend_sentence
from pipeline.train.step import Budget

SHARDS = {"scenes": "/s/scenes", "objects": "/s/objects", "scenes_annotated": "/s/annotated"}
ARM = {a.slug: a for a in ARMS}


def dense_spec(**kw) -> ScenesConfig:
    """The dense preset's scene settings, read from the preset the study applies."""
    scenes = parse_overrides([o for o in PRESETS["dense"] if o.startswith("scenes.")])["scenes"]
    return ScenesConfig(**{**scenes, **kw})


def test_the_dense_preset_writes_coco_density_scenes_that_pycocotools_reads(tmp_path):
    from pycocotools.coco import COCO

    from pipeline.data import scenes

    spec = dense_spec(objects="digits", n_train=40, n_val=10, seed=1)
    assert (spec.canvas, spec.min_objects, spec.max_objects, spec.min_size, spec.max_size) == (96, 3, 9, 14, 32)
    scenes.write_scenes(spec, tmp_path)
    coco = COCO(str(tmp_path / "scenes" / "annotations" / "instances_train2017.json"))
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert len(per_image) == 40
    assert min(per_image) >= 3 and max(per_image) <= 9
    assert statistics.fmean(per_image) >= 4.5  # COCO-like: several objects per scene, not 1-3
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.imgs[ann["image_id"]]
        assert (info["width"], info["height"]) == (96, 96)
        x, y, w, h = ann["bbox"]
        assert 0 < w <= 32 and 0 < h <= 32 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96


def test_a_preset_gets_its_own_scene_folder_results_file_and_overrides_come_after_it(tmp_path):
    full = preset_overrides("dense", DEFAULT_CONFIG, [f"paths.root={tmp_path}", "scenes.max_objects=7"])
    cfg = load_config(DEFAULT_CONFIG, full).resolved()
    assert cfg.scenes.canvas == 96 and cfg.scenes.max_objects == 7  # the user's override wins
    assert cfg.scenes.output == str(tmp_path / "data" / "scenes_fashion_mnist_dense")
    assert cfg.train.checkpoint_fraction == 0.1
    assert results_file(str(tmp_path), "dense").name == "study_results_dense.jsonl"
    assert results_file(str(tmp_path)).name == "study_results.jsonl"
    with pytest.raises(ConfigError, match="unknown study preset"):
        preset_overrides("sparse", DEFAULT_CONFIG, [])


def test_budget_arms_see_3x_and_10x_the_views_and_the_default_arm_sets():
    base = load_config(DEFAULT_CONFIG).resolved()
    views = {}
    for slug in ("ab_simclr", "ab_simclr_3x", "ab_simclr_10x", "simclr", "simclr_3x", "simclr_10x"):
        cfg = arm_config(ARM[slug], 0, base, DEFAULT_CONFIG, [], SHARDS)
        b = Budget.from_config(cfg, 1)
        views[slug] = b.total_steps * b.views_per_step
    for scale in (3, 10):
        for method in ("ab_simclr", "simclr"):
            assert abs(views[f"{method}_{scale}x"] - scale * views[method]) <= scale * 384
    assert scaled_views("train.total_views=@*3", 100) == "train.total_views=300"
    assert scaled_views("train.total_views=@/3", 100) == "train.total_views=33"
    assert scaled_views("views.num_views=0", 100) == "views.num_views=0"
    assert "ab_simclr_10x" in default_arms("dense") and "null_actions" not in default_arms("dense")
    assert "ab_simclr_10x" not in default_arms() and "null_actions" in default_arms()


def test_decoupled_and_mixture_arms_read_the_right_shard_sets():
    base = load_config(DEFAULT_CONFIG).resolved()
    ab = arm_config(ARM["ab_objects_to_scenes"], 0, base, DEFAULT_CONFIG, [], SHARDS)
    assert ab.data.shards == SHARDS["scenes"] and ab.data.annotation_shards == SHARDS["objects"]
    assert ab.objective.name == "ab_simclr" and ab.data.decoupled
    for slug, name in (("simclr_mix", "simclr"), ("dino_mix", "dino")):
        cfg = arm_config(ARM[slug], 0, base, DEFAULT_CONFIG, [], SHARDS)
        assert cfg.objective.name == name and not cfg.data.decoupled
        assert cfg.data.mixture == {SHARDS["scenes"]: 0.5, SHARDS["objects"]: 0.5}


def test_checkpoint_fraction_gives_ten_checkpoints_per_run():
    from pipeline.train.checkpointing import Checkpointer

    cfg = load_config(DEFAULT_CONFIG, ["train.checkpoint_fraction=0.1"])
    ck = Checkpointer.__new__(Checkpointer)
    ck.cfg, ck.total_steps = cfg, 900
    assert [s for s in range(1, 901) if ck.due(s)] == list(range(90, 900, 90))  # + the final one after the loop
    ck.cfg = load_config(DEFAULT_CONFIG, ["train.checkpoint_fraction=0", "train.checkpoint_every_steps=400"])
    assert [s for s in range(1, 901) if ck.due(s)] == [400, 800]


def test_flop_counter_matches_a_hand_count_of_a_linear_layers_matmuls():
    from pipeline.train.flops import count_flops

    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with count_flops() as counted:
        layer(x).sum().backward()
    forward = 2 * 8 * 64 * 32  # a multiply-add is 2 FLOPs
    assert counted.total == 3 * forward  # backward: the input's gradient and the weight's, one matmul each


def test_the_trend_fit_recovers_a_known_slope_as_numpy_does():
    rng = np.random.default_rng(0)
    views = [115_200, 345_600, 1_152_000]
    points = [(v, -4.0 + 1.5 * math.log10(v / 115_200) + rng.normal(0, 0.5)) for v in views for _ in range(3)]
    trend = fit_trend(points)
    x = np.log10([v for v, _ in points])
    y = np.array([g for _, g in points])
    (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)
    assert trend.slope == pytest.approx(slope) and trend.intercept == pytest.approx(intercept)
    assert trend.slope_se == pytest.approx(math.sqrt(cov[0, 0]))
    assert abs(trend.slope - 1.5) < 3 * trend.slope_se
    # noise-free: the slope, and the crossing at 10^(4/1.5) x 115,200 views, exactly
    exact = fit_trend([(v, -4.0 + 1.5 * math.log10(v / 115_200)) for v in views])
    assert exact.slope == pytest.approx(1.5) and exact.slope_se == pytest.approx(0, abs=1e-9)
    assert exact.crossing_views == pytest.approx(115_200 * 10 ** (4 / 1.5), rel=1e-6)
    one = fit_trend([(115_200, -2.0), (115_200, -4.0)])
    assert one.budgets == 1 and one.slope_se is None and one.intercept == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        fit_trend([])


def _rows(slope_points: float, seeds: int = 2) -> list[dict]:
    """Synthetic study rows: SimCLR at 40 %, AB at 40 % - 6 + slope x log10(budget), on every seed and budget."""
    rows = []
    for scale, (ab, base) in BUDGET_PAIRS["AB_SimCLR - SimCLR (dense scenes)"].items():
        for seed in range(seeds):
            jitter = 0.001 * seed
            gap = (-6.0 + slope_points * math.log10(scale)) / 100
            common = {"seed": seed, "views": 115_200 * scale, "pretrain_s": 10.0 * scale, "eval_s": 5.0}
            rows.append({"arm": base, "coco_objects/box_linear_top1": 0.40 + jitter, "steps": 900 * scale, **common})
            rows.append(
                {
                    "arm": ab,
                    "coco_objects/box_linear_top1": 0.40 + jitter + gap,
                    "steps": 300 * scale,
                    "train_flops": 2e13 * scale,
                    "curve_eval_s": 50.0,
                    "curve_checkpoints": 10,
                    **common,
                }
            )
    return rows


def test_gap_points_pair_seeds_and_the_sentence_reports_the_rows_figures():
    rows = _rows(2.0)
    pairs = BUDGET_PAIRS["AB_SimCLR - SimCLR (dense scenes)"]
    points = gap_points(rows, pairs, "coco_objects/box_linear_top1")
    assert len(points) == 6 and sorted({v for v, _ in points}) == [115_200, 345_600, 1_152_000]
    assert fit_trend(points).slope == pytest.approx(2.0)
    line = trend_sentence("AB - SimCLR", "coco_objects/box_linear_top1", points)
    assert "-6.0 ± 0.0 at 115,200 views (n=2)" in line and "-4.0 ± 0.0 at 1,152,000 views" in line
    assert "fitted slope +2.0 ± 0.0 points per decade" in line and "reach 0 at about 1.2e+08 views" in line
    widening = trend_sentence(
        "x", "coco_objects/box_linear_top1", gap_points(_rows(-1.0), pairs, "coco_objects/box_linear_top1")
    )
    assert "does not close the gap" in widening
    ahead = trend_sentence("x", "folder/linear_top1", [(1e5, 0.01), (1e5, 0.02), (1e6, 0.03), (1e6, 0.04)])
    assert "keeps the gap positive and widening" in ahead and "does not close" not in ahead
    assert gap_points([r for r in rows if r["arm"] != "simclr_3x"], pairs, "coco_objects/box_linear_top1") != points


def test_cost_table_and_report_show_each_runs_cost():
    rows = _rows(2.0)
    lines = cost_table(rows, ["ab_simclr_3x"], {"ab_simclr_3x": "AB 3x"})
    assert lines[2] == "| AB 3x | 2 | 345,600 | 900 | 60.0 | 30 | 5 | 5.0 |"
    report = curves_report(rows)
    assert "**Cost of each run**" in report and "fitted slope +2.0" in report
    assert "| SimCLR, 3x the views | 2 | 345,600 | 2,700 | — |" in report  # no FLOPs recorded: a dash, not 0


def test_sweep_records_keep_the_box_linear_probe():
    """box_linear's metrics are `box_linear_*`: a sweep once read them as a probe named "box" and dropped them."""
    from pipeline.eval.sweep import _probe_metrics

    kept = _probe_metrics({"box_linear_top1": 0.3, "random_init/box_linear_top1": 0.2, "knn_top1": 0.5, "n_train": 9})
    assert kept == {"box_linear_top1": 0.3, "random_init/box_linear_top1": 0.2, "knn_top1": 0.5}


def test_the_published_curves_block_is_the_committed_rows_block():
    """docs/study.md's curves block is what scripts/make_figures.py makes of the committed rows it names, and
    the README quotes its dense AB_SimCLR - SimCLR trend sentence word for word."""
    import importlib.util
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_figures", repo / "scripts" / "make_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    doc = (repo / "docs" / "study.md").read_text()
    block = doc.split(figures.CURVES_START)[1].split(figures.CURVES_END)[0].strip("\n")
    named = re.findall(r"`(benchmarks/results/curves_study_[\w.-]+\.jsonl)`", block)
    assert named, "the curves block names no committed results file"
    rows = figures.read_rows(repo / named[0])
    assert block.split("\n") == figures.curves_block(rows, named[0])
    quoted = [
        line for line in block.split("\n") if line.startswith("- AB_SimCLR - SimCLR (dense scenes), box cls (linear")
    ]
    assert quoted and quoted[0][2:] in (repo / "README.md").read_text()


def test_the_gap_inside_the_runs_pairs_checkpoints_at_equal_views():
    from pipeline.study_curves import curve_gap_points

    pairs = {1: ("ab_simclr", "simclr")}
    ab = {"arm": "ab_simclr", "seed": 0, "curve": [{"views": v, "m_top1": 0.1 * i} for i, v in enumerate((10, 20, 30))]}
    base = {"arm": "simclr", "seed": 0, "curve": [{"views": v, "m_top1": 0.05} for v in (10, 30, 40)]}
    other_seed = {"arm": "simclr", "seed": 1, "curve": [{"views": 20, "m_top1": 0.0}]}
    points = curve_gap_points([ab, base, other_seed], pairs, "m_top1")
    assert points == [(10, pytest.approx(-5.0)), (30, pytest.approx(15.0))]  # 20 views: no baseline point, seed 0
