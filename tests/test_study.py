"""The scenes study (pipeline/study.py): its arms are real configs, its tables are recomputed here by hand."""

from __future__ import annotations

import statistics

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.study import ARMS, DEFAULT_CONFIG, arm_config, summarise
from pipeline.train.step import Budget
from pipeline.train.trainer import check_cpu_budget

SHARDS = {
    "scenes": "/data/shards/scenes",
    "objects": "/data/shards/objects",
    "scenes_annotated": "/data/shards/scenes_annotated10",
}


def _row(arm, seed, box, floor=None, **extra):
    row = {"arm": arm, "seed": seed, "coco_objects/decoder_top1": box, **extra}
    if floor is not None:
        row["coco_objects/random_init/decoder_top1"] = floor
    return row


def test_summary_table_matches_a_hand_computation():
    rows = [_row("ab_simclr", s, v, f) for s, (v, f) in enumerate([(0.40, 0.20), (0.44, 0.22), (0.42, 0.24)])]
    rows += [_row("simclr", s, v, f) for s, (v, f) in enumerate([(0.30, 0.20), (0.34, 0.22)])]
    rows += [_row("null_actions", 0, 0.35, 0.20, **{"coco_detection/decoder_map": 0.012})]
    lines = summarise(rows, ARMS, "scenes")
    assert lines[0].startswith("| arm | seeds | box cls (decoder top-1 %) | detection (decoder mAP) |")
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    floor_sd = statistics.stdev([20.0, 22.0, 24.0])  # one figure per seed, whichever arm carried it
    assert f"| 3 | 22.0 ± {floor_sd:.1f} | — |" in table["Random-init encoder (same probes)"]
    assert "| 3 | 42.0 ± 2.0 (paper 72.6) | — (paper 0.27) |" in table["AB_SimCLR"]
    assert f"| 2 | 32.0 ± {statistics.stdev([30.0, 34.0]):.1f} (paper 70.4) |" in table["SimCLR (equal views)"]
    assert "| 1 | 35.0 | 0.012 |" in table["AB_SimCLR, no action tokens (Table 4)"]
    assert "| 0 | — | — |" in table["AB_SimCLR, no target network (Table 4)"]
    assert summarise(rows, ARMS, "clip") == []  # no clip rows yet: no table


def test_every_arm_resolves_to_a_real_config():
    base = load_config(DEFAULT_CONFIG).resolved()
    for arm in ARMS:
        cfg = arm_config(arm, 1, base, DEFAULT_CONFIG, [], SHARDS)  # unknown keys would raise ConfigError
        assert cfg.train.seed == 1 and cfg.train.run_name == f"study-{arm.slug}-s1"
        assert cfg.data.shards == SHARDS["scenes" if arm.data == "mix" else arm.data]
        assert cfg.data.annotation_shards == (SHARDS[arm.annotations] if arm.annotations else "")
        assert cfg.data.decoupled == bool(arm.annotations)
        check_cpu_budget(cfg, cfg.ray.num_cpus)  # fits the study's CPUs: a decoupled run needs two streams


def test_text_tower_arms_add_the_zero_shot_and_retrieval_readouts(tmp_path):
    """Only the methods with a text tower get the readouts and the captions task; the captions arms build."""
    from pipeline.objectives.registry import build_objective
    from pipeline.study import TEXT_READOUTS, eval_config

    base = load_config(DEFAULT_CONFIG).resolved()
    arms = {a.slug: arm_config(a, 0, base, DEFAULT_CONFIG, [], SHARDS) for a in ARMS}
    for slug in ("ab_clip", "clip", "ab_clip_captions", "clip_captions"):
        ev = eval_config(arms[slug], "ckpt", 0).eval
        assert set(TEXT_READOUTS) <= set(ev.probes) and set(base.eval.probes) <= set(ev.probes), slug
        assert ev.task_roots["coco_captions"] == ev.task_roots["coco_objects"], slug  # the scenes' val captions
    for slug in ("ab_simclr", "simclr"):
        ev = eval_config(arms[slug], "ckpt", 0).eval
        assert ev.probes == base.eval.probes and "coco_captions" not in ev.task_roots, slug
    for slug in ("ab_clip_captions", "clip_captions"):
        cfg = arms[slug]
        assert cfg.views.text.source == "captions" and cfg.objective.name == slug.split("_captions")[0]
        build_objective(cfg)  # the crop stage feeds what the method reads (check_views raises otherwise)


def test_the_partly_annotated_arms_see_boxes_of_the_same_scenes():
    """AB_CLIP's annotations and CLIP's whole data are the annotated share; AB_CLIP's crops are all scenes."""
    base = load_config(DEFAULT_CONFIG).resolved()
    arms = {a.slug: arm_config(a, 0, base, DEFAULT_CONFIG, [], SHARDS) for a in ARMS}
    ab, clip = arms["ab_clip_partial"], arms["clip_partial"]
    assert ab.data.annotation_shards == clip.data.shards == SHARDS["scenes_annotated"]
    assert ab.data.shards == SHARDS["scenes"]
    assert (ab.objective.name, clip.objective.name) == ("ab_clip", "clip")
    assert ab.views.text == arms["ab_clip"].views.text and clip.views.text == arms["clip"].views.text


def test_equal_views_and_equal_steps_arms():
    """SimCLR (2 views per image) gets 3x AB's steps at equal views; its check arm holds AB's step count."""
    base = load_config(DEFAULT_CONFIG).resolved()
    arms = {a.slug: a for a in ARMS}
    steps = {s: Budget.from_config(arm_config(arms[s], 0, base, DEFAULT_CONFIG, [], SHARDS), 1) for s in arms}
    assert steps["simclr"].total_steps == 3 * steps["ab_simclr"].total_steps
    assert steps["simclr_equal_steps"].total_steps == steps["ab_simclr"].total_steps
    assert steps["clip_partial_equal_steps"].total_steps == steps["ab_clip_partial"].total_steps
    views = {s: b.views_per_step * b.total_steps for s, b in steps.items()}
    for slug in ("simclr", "ab_clip", "clip", "null_actions", "objects_simclr", "ab_clip_partial", "clip_partial"):
        assert abs(views[slug] - views["ab_simclr"]) < steps[slug].views_per_step  # equal views, to one step


def test_unknown_arm_is_a_config_error(tmp_path):
    from pipeline.study import run_study

    with pytest.raises(ConfigError, match="unknown study arm"):
        run_study(DEFAULT_CONFIG, [f"paths.root={tmp_path}"], arms=["ab_simclr", "moco"])


def test_a_second_study_on_the_same_root_is_refused_before_any_work(tmp_path):
    from pipeline.study import hold_study_lock, run_study

    held = hold_study_lock(tmp_path)  # a study already running on this root (flock: per open file)
    with pytest.raises(ConfigError, match="another `abpipe study` is running on"):
        run_study(DEFAULT_CONFIG, [f"paths.root={tmp_path}"], arms=["ab_simclr"])
    assert not (tmp_path / "data").exists() and not (tmp_path / "shards").exists()  # refused before the data
    held.close()  # the first one ends: the root is free again
    hold_study_lock(tmp_path).close()


def test_study_report_prints_the_tables_of_a_results_file(tmp_path, capsys):
    import json

    from pipeline.cli import main

    rows = [_row("ab_simclr", 0, 0.40, 0.20), _row("simclr", 0, 0.30, 0.20), _row("ab_simclr", 1, 0.44, 0.22)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["study", "--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "| AB_SimCLR | 2 | 42.0 ± 2.8 (paper 72.6) |" in out
        and "| SimCLR (equal views) | 1 | 30.0 (paper 70.4) |" in out
    )
    assert main(["study", "--report", str(tmp_path / "missing.jsonl")]) == 1


def test_the_random_init_floor_is_probed_once_per_seed_and_data():
    from pipeline.study import random_init_row

    done = {
        ("ab_simclr", 0): {"arm": "ab_simclr", "seed": 0, "data": "scenes", "run_id": "a0", "x/random_init/y": 0.2},
        ("simclr", 0): {"arm": "simclr", "seed": 0, "data": "scenes", "run_id": "s0", "x/y": 0.5},
        ("ab_simclr", 1): {"arm": "ab_simclr", "seed": 1, "data": "scenes", "run_id": "a1", "x/y": 0.4},
    }
    assert random_init_row(done, 0, "scenes")["run_id"] == "a0"
    assert random_init_row(done, 1, "scenes") is None  # seed 1's row has no floor: probe it
    assert random_init_row(done, 0, "objects") is None  # another pretraining set has its own floor row
    # a floor probed before the study's probes grew is not reused for a row that needs the new probe's
    done[("ab_simclr", 0)]["x/random_init/decoder_top1"] = 0.3
    assert random_init_row(done, 0, "scenes", ["decoder"])["run_id"] == "a0"
    assert random_init_row(done, 0, "scenes", ["decoder", "box_linear"]) is None
    # the partly annotated scenes share the scenes' floor, whichever arm probed it
    done = {
        ("clip_partial", 2): {
            "arm": "clip_partial",
            "seed": 2,
            "data": "scenes_annotated",
            "run_id": "c2",
            "x/random_init/y": 0.2,
        }
    }
    assert random_init_row(done, 2, "scenes")["run_id"] == "c2"
    assert {a.slug: a.floor_data for a in ARMS if a.table == "partial"} == {
        "ab_clip_partial": "scenes",
        "clip_partial": "scenes",
        "clip_partial_equal_steps": "scenes",
    }


def test_a_tables_floor_is_one_figure_per_seed():
    """Both partly annotated arms carry seed 0's floor (copied from one row): it counts once, no spread."""
    rows = [
        _row("ab_clip_partial", 0, 0.40, 0.20, data="scenes"),
        _row("clip_partial", 0, 0.50, 0.20, data="scenes_annotated"),
    ]
    rows += [_row("ab_clip_partial", 1, 0.42, 0.24, data="scenes")]
    lines = summarise(rows, ARMS, "partial")
    assert f"| Random-init encoder (same probes) | 2 | 22.0 ± {statistics.stdev([20.0, 24.0]):.1f} |" in lines[2]


def test_the_published_study_tables_are_the_committed_rows_tables():
    """docs/study.md's study block names its raw rows under benchmarks/results/ and shows exactly the
    tables `abpipe study --report` makes of them; the README shows the same tables."""
    import re
    from pathlib import Path

    from pipeline.study import TABLES, report

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "study.md").read_text()
    block = doc.split("<!-- scenes-study:start -->")[1].split("<!-- scenes-study:end -->")[0]
    named = re.findall(r"benchmarks/results/(scenes_study_[\w.-]+\.jsonl)", block)
    assert named, "the study block names no committed results file"
    tables = report(repo / "benchmarks" / "results" / named[0])
    assert tables and tables in block, "docs/study.md's tables differ from the committed rows' report"
    readme = (repo / "README.md").read_text()
    shown = [name for name in TABLES if f"**{TABLES[name]}**" in tables]  # every table with rows
    assert {"scenes", "clip", "objects"} <= set(shown)
    for name in shown:
        table = tables.split(f"**{TABLES[name]}**\n\n")[1].split("\n\n")[0]
        assert table in readme, f"the README's {name} table differs from the committed rows'"
