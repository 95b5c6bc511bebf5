"""`abpipe sweep`: checkpoints x tasks of two pretraining runs, resumed after an interruption, with a
corrupt checkpoint, through real Ray, a real MLflow sqlite store and the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import save_checkpoint
from pipeline.config import (
    Config,
    EvalConfig,
    ObjectiveConfig,
    PathsConfig,
    RayConfig,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
    ViewsConfig,
)
from tests.micro import MICRO_MODEL

EXPERIMENT = "sweep-test"


def _checkpoint(directory, cfg: Config, step: int, run_id: str | None, seed: int):
    """A tiny checkpoint written directly (no training): a seeded random encoder."""
    from pipeline.models.encoder import build_encoder

    torch.manual_seed(seed)
    state = build_encoder(cfg.model, cfg.views.view_size).state_dict()
    return save_checkpoint(
        directory,
        {"encoder_teacher": state, "encoder_student": state},
        {"config": cfg.to_dict(), "step": step, "mlflow_run_id": run_id},
    )


def _pretraining_run(cfg: Config, name: str, objective: str) -> tuple[str, Config]:
    from pipeline.tracking import start_run

    run_cfg = dataclasses.replace(
        cfg, objective=ObjectiveConfig(name=objective), train=dataclasses.replace(cfg.train, run_name=name)
    )
    params = {k: v for k, v in run_cfg.flat().items() if k.startswith(("train.", "objective."))}
    run_id = start_run(
        cfg.tracking.tracking_uri, EXPERIMENT, name, params, {"abpipe.kind": "pretrain", "abpipe.objective": objective}
    )
    return run_id, run_cfg


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, digits_folder):
    """Run A (2 local checkpoints), run B (a checkpoint only in MLflow artifacts + a corrupt local one)."""
    from tests.task_fixtures import make_resisc45

    root = tmp_path_factory.mktemp("sweep_root")
    cfg = Config(
        paths=PathsConfig(root=str(root)),
        ray=RayConfig(num_cpus=2),
        views=ViewsConfig(view_size=32),
        model=MICRO_MODEL,
        train=TrainConfig(storage_path=str(root / "ray_results")),
        tracking=TrackingConfig(experiment=EXPERIMENT),
    ).resolved()
    run_a, cfg_a = _pretraining_run(cfg, "ab-run", "ab_simclr")
    run_b, cfg_b = _pretraining_run(cfg, "simclr-run", "simclr")
    _pretraining_run(cfg, "crashed-run", "ab_simclr")  # died before its first checkpoint
    storage = cfg.train.storage_path
    for step, seed in ((5, 1), (10, 2)):
        _checkpoint(os.path.join(storage, "ab-run", f"checkpoint_{step:08d}"), cfg_a, step, run_a, seed)
    staged = _checkpoint(root / "staged", cfg_b, 4, run_b, 3)
    client = MlflowClient(cfg.tracking.tracking_uri)
    for name in ("state.pt", "meta.json"):
        client.log_artifact(run_b, str(staged / name), "checkpoints/step_00000004")
    corrupt = _checkpoint(os.path.join(storage, "simclr-run", "checkpoint_00000010"), cfg_b, 10, run_b, 4)
    (corrupt / "state.pt").write_bytes(b"\x00truncated by a full disk")
    tasks = {"folder": str(digits_folder), "resisc45": make_resisc45(str(root / "resisc45"))}
    ev = EvalConfig(tasks=list(tasks), task_roots=tasks, probes=["knn"], max_per_split=40, batch_size=64)
    sweep_cfg = dataclasses.replace(cfg, eval=ev, sweep=SweepConfig(runs=[run_a, run_b], experiments=[EXPERIMENT]))
    return sweep_cfg, run_a, run_b, corrupt / "state.pt"


def _finished(client, key: str, task: str) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    query = (
        f"tags.`abpipe.kind` = 'eval' and tags.`abpipe.checkpoint_key` = '{key}' and tags.`abpipe.task` = '{task}' "
        "and attributes.status = 'FINISHED'"
    )
    return client.search_runs([exp], query)


def test_checkpoint_enumeration(two_runs):
    from pipeline.eval.sweep import dir_checkpoints, run_checkpoints

    cfg, run_a, run_b, corrupt = two_runs
    client = MlflowClient(cfg.tracking.tracking_uri)
    refs_a = run_checkpoints(client, client.get_run(run_a))
    assert [(r.key, r.step) for r in refs_a] == [(f"{run_a}@5", 5), (f"{run_a}@10", 10)]
    assert all(os.path.isdir(r.ref) for r in refs_a) and refs_a[0].row == f"ab_simclr: ab-run ({run_a[:8]})"
    refs_b = run_checkpoints(client, client.get_run(run_b))
    assert [r.ref for r in refs_b] == [f"runs:/{run_b}/checkpoints/step_00000004", str(corrupt.parent)]
    assert [r.key for r in run_checkpoints(client, client.get_run(run_b), latest_only=True)] == [f"{run_b}@10"]
    # a Ray Train run dir given directly: same keys as via the run, so the pairs are shared
    storage = cfg.train.storage_path
    assert [r.key for r in dir_checkpoints(os.path.join(storage, "ab-run"))] == [r.key for r in refs_a]
    # an unreadable checkpoint is still listed (its evaluation records the error) keyed by its path
    broken = os.path.join(storage, "broken-run", "checkpoint_00000001")
    os.makedirs(broken)
    with open(os.path.join(broken, "meta.json"), "w") as fh:
        fh.write("{not json")
    assert [r.key for r in dir_checkpoints(os.path.dirname(broken))] == [f"path:{broken}"]


def test_sweep_resumes_skips_done_pairs_and_records_failures(ray_cluster, two_runs, capsys):
    from pipeline.cli import main
    from pipeline.eval.job import evaluate_checkpoint
    from pipeline.eval.sweep import run_sweep
    from pipeline.tracking import start_run

    cfg, run_a, run_b, corrupt = two_runs
    client = MlflowClient(cfg.tracking.tracking_uri)
    a5 = os.path.join(cfg.train.storage_path, "ab-run", "checkpoint_00000005")
    # An earlier sweep was killed: (A@5, folder) finished; (A@5, resisc45) was left RUNNING.
    pre = evaluate_checkpoint(cfg, a5, {"folder": cfg.eval.task_roots["folder"]}, key=f"{run_a}@5")
    pre_run = pre["tasks"]["folder"]["run_id"]
    start_run(
        cfg.tracking.tracking_uri,
        EXPERIMENT,
        "eval/resisc45",
        {},
        {"abpipe.kind": "eval", "abpipe.checkpoint_key": f"{run_a}@5", "abpipe.task": "resisc45"},
    )

    first = run_sweep(cfg)
    assert first["pairs"] == 8  # (A@5, A@10, B@4, B@10) x (folder, resisc45)
    assert first["skipped"] == [(f"{run_a}@5", "folder")]
    assert sorted(first["evaluated"]) == sorted(
        [
            (f"{run_a}@5", "resisc45"),
            (f"{run_a}@10", "folder"),
            (f"{run_a}@10", "resisc45"),
            (f"{run_b}@4", "folder"),
            (f"{run_b}@4", "resisc45"),
        ]
    )
    crashed, *broken = sorted(first["failures"], key=lambda f: f["task"])
    assert (
        crashed["task"] == "*"
        and "no checkpoint in" in crashed["error"]
        and "crashed-run/checkpoint_*" in crashed["error"]
    ), crashed
    assert sorted(f["task"] for f in broken) == ["folder", "resisc45"]
    assert all(f["key"] == f"{run_b}@10" and str(corrupt) in f["error"] for f in broken), broken
    assert [r.info.run_id for r in _finished(client, f"{run_a}@5", "folder")] == [pre_run], (
        "the finished pair was not redone"
    )

    # The comparison table: one row per pretraining run, its newest evaluated checkpoint, per task.
    header, rows = first["table"]["header"], first["table"]["rows"]
    assert header == ["run", "step", "folder/knn_top1", "folder/knn_top5", "resisc45/knn_top1"]
    by_row = {r[0]: r for r in rows}
    assert set(by_row) == {f"ab_simclr: ab-run ({run_a[:8]})", f"simclr: simclr-run ({run_b[:8]})"}
    for run_id, label, key in (
        (run_a, "ab_simclr: ab-run", f"{run_a}@10"),
        (run_b, "simclr: simclr-run", f"{run_b}@4"),
    ):
        row = by_row[f"{label} ({run_id[:8]})"]
        assert row[1] == key.split("@")[1]
        for col, task, metric in ((2, "folder", "knn_top1"), (4, "resisc45", "knn_top1")):
            (evaluated,) = _finished(client, key, task)
            assert row[col] == pytest.approx(evaluated.data.metrics[metric])
    md = open(os.path.join(first["output"], "comparison.md")).read()
    assert "| run | step | folder/knn_top1 |" in md and "Failed pairs" in md and str(corrupt) in md
    sweep_run = client.get_run(first["run_id"])
    assert (
        sweep_run.data.metrics["failed"] == 3
        and sweep_run.data.metrics["evaluated"] == 5
        and sweep_run.info.status == "FINISHED"
    )
    assert {a.path for a in client.list_artifacts(first["run_id"])} >= {
        "comparison.md",
        "comparison.csv",
        "failures.csv",
        "all_checkpoints.csv",
        "metrics_vs_step.png",
    }

    # Re-run through the CLI: nothing is evaluated twice, failures are retried (and fail again).
    capsys.readouterr()
    tasks = cfg.eval.task_roots
    argv = ["sweep", "--json", "--experiments", EXPERIMENT]
    argv += ["--tasks", "folder,resisc45", f"paths.root={cfg.paths.root}", f"tracking.experiment={EXPERIMENT}"]
    argv += [
        f"eval.task_roots={json.dumps(tasks)}",
        "eval.probes=[knn]",
        "eval.max_per_split=40",
        "eval.batch_size=64",
        f"train.storage_path={cfg.train.storage_path}",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)  # --json: stdout is the result document alone
    assert "| run | step |" not in captured.out
    assert "sweep: 8 pairs: 0 evaluated, 6 already done, 3 failed" in captured.err
    assert second["evaluated"] == [] and len(second["skipped"]) == 6 and len(second["failures"]) == 3
    assert second["table"] == json.loads(json.dumps(first["table"]))
    for key in (f"{run_a}@5", f"{run_a}@10", f"{run_b}@4"):
        for task in tasks:
            assert len(_finished(client, key, task)) == 1, (key, task)
