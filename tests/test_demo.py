"""The demo's closing tables: the losses against chance, and each probe pretrained next to random init."""

from __future__ import annotations

from pipeline.demo import _print_summary


def test_demo_summary_shows_losses_against_chance_and_the_probe_table(capsys):
    evaluation = {
        "step": 300,
        "tasks": {
            "folder": {
                "n_train": 1257,
                "n_test": 540,
                "skipped": {},
                "cached": [],
                "rows": [("knn_top1", 0.61, 0.40), ("linear_top1", 0.83, 0.60)],
            }
        },
        "failures": {},
    }
    train = {
        "run_id": "abc",
        "checkpoint": "/ck",
        "metrics": {"step": 300, "loss": 7.1, "loss_annotation": 3.3, "loss_propagation": 3.8, "views_per_s": 210},
    }
    timings = {"ingest_s": 20.0, "pretrain_s": 250.0, "eval_s": 40.0}
    _print_summary({"counts": {"ok": 1797}}, train, evaluation, timings, "/shards", "sqlite:///x.db", "ab_simclr", 64)
    out = capsys.readouterr().out
    assert "eval of ab_simclr: pretrained vs a random init" in out
    assert "annotation 3.30, propagation 3.80 (chance: log 64 = 4.16 nats each)" in out
    lines = [line for line in out.splitlines() if "linear_top1" in line]
    assert len(lines) == 1 and "0.83" in lines[0] and "0.60" in lines[0]
    assert len(out.splitlines()) < 30  # two compact tables, not a dump
