"""scripts/make_figures.py reads any study jsonl (arm, seed, metric columns) and writes its table and plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_study(path: Path) -> list[dict]:
    """Two arms the study module does not know, 3 and 1 seeds, a superseded row, two probe metrics."""
    rng = np.random.default_rng(0)
    rows = []
    for arm, seeds in (("scenes_ab", 3), ("scenes_simclr", 1)):
        for seed in range(seeds):
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "run_id": f"{arm}{seed}",
                    "probe_top1": float(rng.uniform(0.3, 0.9)),
                    "knn_top1": float(rng.uniform(0.3, 0.9)),
                    "linear_train_top1": 0.99,
                    "random_init/probe_top1": 0.2 + 0.01 * seed,
                    "train/loss": 4.0,
                }
            )
    stale = dict(rows[0], probe_top1=0.0)  # an earlier attempt at (scenes_ab, 0): the later row wins
    path.write_text("\n".join(json.dumps(r) for r in [stale, *rows]) + "\n\n")
    return rows


def test_study_summary_matches_an_independent_computation(tmp_path, figures):
    rows = write_study(tmp_path / "study.jsonl")
    read = figures.read_rows(tmp_path / "study.jsonl")
    assert len(read) == len(rows)
    metrics = figures.study_metrics(read)
    assert metrics == ["probe_top1", "knn_top1"]  # not train_top1, random_init/ or train/ columns
    summary = figures.summarise_study(read, metrics)
    assert summary["arms"] == ["scenes_ab", "scenes_simclr"]
    for arm in summary["arms"]:
        for metric in metrics:
            values = np.array([r[metric] for r in rows if r["arm"] == arm])
            mean, sd, n, _ = summary["cells"][(arm, metric)]
            assert mean == pytest.approx(values.mean()) and n == len(values)
            assert (sd is None) if n == 1 else sd == pytest.approx(values.std(ddof=1))
    floor = np.array([0.20, 0.21, 0.22])  # one value per seed, however many arms share the seed
    assert summary["floor"]["probe_top1"][:3] == (pytest.approx(floor.mean()), pytest.approx(floor.std(ddof=1)), 3)
    assert "knn_top1" not in summary["floor"]

    table = figures.study_table(summary, metrics, figures.arm_labels(summary["arms"]))
    ab = np.array([r["probe_top1"] for r in rows if r["arm"] == "scenes_ab"]) * 100
    assert f"| scenes_ab | {ab.mean():.1f} ± {ab.std(ddof=1):.1f} |" in "\n".join(table)
    assert table[2].startswith("| *random-init encoder")


def test_study_plot_and_doc_block(tmp_path, figures):
    write_study(tmp_path / "study.jsonl")
    doc = tmp_path / "study.md"
    doc.write_text(f"intro\n{figures.TABLE_START}\nold table\n{figures.TABLE_END}\nafter\n")
    figures.main(
        [
            "--only",
            "study",
            "--study-jsonl",
            str(tmp_path / "study.jsonl"),
            "--out",
            str(tmp_path),
            "--study-doc",
            str(doc),
        ]
    )
    text = doc.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith(f"{figures.TABLE_END}\nafter\n")
    assert "| scenes_simclr |" in text and "4 runs" in text
    with Image.open(tmp_path / "study.png") as image:
        assert image.size[0] > 600 and image.size[1] > 300


def test_a_row_without_an_arm_is_one_clear_error(tmp_path, figures):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"seed": 0, "probe_top1": 0.5}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: a study row needs an 'arm' column"):
        figures.read_rows(tmp_path / "bad.jsonl")


def test_budget_plot_and_curves_block_from_study_rows(tmp_path, figures):
    """The curves study's figure and docs block: a line per run over its checkpoints, the tables, the trend."""
    rows = []
    for arm, scale, per_step in (
        ("ab_simclr", 1, 384),
        ("simclr", 1, 128),
        ("ab_simclr_3x", 3, 384),
        ("simclr_3x", 3, 128),
    ):
        steps = 300 * scale * 384 // per_step
        gap = -0.06 + 0.02 * np.log10(scale) if arm.startswith("ab") else 0.0
        curve = [
            {"step": s, "views": s * per_step, "flops": s * 1e10, "coco_objects/box_linear_top1": 0.3 + gap * s / steps}
            for s in range(steps // 10, steps + 1, steps // 10)
        ]
        rows.append(
            {
                "arm": arm,
                "seed": 0,
                "views": steps * per_step,
                "steps": steps,
                "coco_objects/box_linear_top1": 0.4 + gap,
                "coco_objects/random_init/box_linear_top1": 0.2,
                "curve": curve,
            }
        )
    (tmp_path / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "study.md"
    doc.write_text(f"intro\n{figures.CURVES_START}\nold\n{figures.CURVES_END}\nafter\n")
    figures.main(
        [
            "--only",
            "budget",
            "--curves-jsonl",
            str(tmp_path / "curves.jsonl"),
            "--out",
            str(tmp_path),
            "--study-doc",
            str(doc),
        ]
    )
    text = doc.read_text()
    assert "old" not in text and text.endswith(f"{figures.CURVES_END}\nafter\n")
    assert "| AB_SimCLR, 3x the views | 1 |" in text and "4 runs" in text
    assert "-6.0 at 115,200 views (n=1); -5.0 at 345,600 views (n=1); fitted slope +2.0" in text
    with Image.open(tmp_path / "budget.png") as image:
        assert image.size[0] > 900 and image.size[1] > 500
