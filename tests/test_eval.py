"""Eval job: probes against references, and the whole job through real Ray Data + a real MLflow store."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import (
    Config,
    EvalConfig,
    PathsConfig,
    RayConfig,
    TrackingConfig,
    ViewsConfig,
)
from pipeline.models.checkpoint import CheckpointError, save_checkpoint
from tests.micro import MICRO_MODEL

# ----------------------------------------------------------------------------------------- probes


def knn_reference(train_x, train_y, test_x, k, t):
    """DINO's weighted kNN written the slow, obvious way."""
    preds = []
    for q in test_x:
        qn = q / np.linalg.norm(q)
        sims = [float(qn @ (x / np.linalg.norm(x))) for x in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = {}
        for i in nearest:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + np.exp(sims[i] / t)
        preds.append(max(votes, key=votes.get))
    return np.array(preds)


def test_knn_matches_reference():
    from pipeline.eval.probes import PROBES
    from pipeline.eval.probes.knn import knn_predict

    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(80, 16))
    train_y, test_y = rng.integers(0, 7, 300), rng.integers(0, 7, 80)
    ref = knn_reference(train_x, train_y, test_x, k=20, t=0.07)
    np.testing.assert_array_equal(knn_predict(train_x, train_y, test_x, k=20, temperature=0.07)[:, 0], ref)
    # string labels through the registry give the same accuracy
    names = np.array([f"class_{i}" for i in range(7)])
    metrics = PROBES["knn"](train_x, names[train_y], test_x, names[test_y], EvalConfig())
    assert metrics["top1"] == pytest.approx(float((ref == test_y).mean()))
    assert metrics["top1"] <= metrics["top5"] <= 1.0


def test_linear_probe_separable_vs_random_labels():
    from pipeline.eval.probes import PROBES

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(5, 32))
    y = rng.integers(0, 5, 1000)
    x = centres[y] + rng.normal(size=(1000, 32)) + 100.0  # offset: standardisation must handle it
    cfg = EvalConfig(linear_epochs=100)
    good = PROBES["linear"](x[:600], y[:600], x[600:], y[600:], cfg)
    assert good["top1"] > 0.97, good
    shuffled = rng.permutation(y)
    noise = PROBES["linear"](x[:600], shuffled[:600], x[600:], shuffled[600:], cfg)
    assert noise["top1"] < 0.32, noise  # chance is 0.2
    assert PROBES["linear"](x[:600], y[:600], x[600:], y[600:], cfg) == good, "seeded -> deterministic"


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_state(digits_folder, tmp_path_factory):
    """Micro-model weights trained (supervised, ~2 s) on digits *not* in the `digits_folder` set.

    A random ViT's pooled features barely separate these digits (kNN ~0.15-0.2, chance 0.1), so a
    checkpoint that has learnt something is what makes "pretrained beats random init" testable.
    Seeded like the trainer (train.seed=0), so the job's random-init reference is this model's init.
    """
    import torch.nn.functional as F

    from pipeline.data.sample_data import write_digits_folder
    from pipeline.eval.features import load_and_resize
    from pipeline.eval.job import list_labelled_folder
    from pipeline.models.ab_model import build_model, images_to_float

    probe_set = {p.name for p in digits_folder.rglob("*.png")}
    everything = write_digits_folder(tmp_path_factory.mktemp("all_digits"), size=32)
    held_out = [it for it in list_labelled_folder(str(everything)) if it["input"].rsplit("/", 1)[-1] not in probe_set]
    x = torch.from_numpy(np.stack([load_and_resize(it["input"], 32) for it in held_out]))
    y = torch.tensor([int(it["label"]) for it in held_out])
    torch.manual_seed(0)
    model = build_model(MICRO_MODEL, 32)
    head = torch.nn.Linear(model.embed_dim, 10)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(20):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(head(model.encoder_features(images_to_float(x[idx]))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


@pytest.fixture
def pretrain_setup(tmp_path, trained_state):
    """A checkpoint whose meta points at a real (sqlite) pretraining run."""
    from pipeline.train.tracking import start_run

    cfg = Config(
        paths=PathsConfig(root=str(tmp_path / "root")),
        ray=RayConfig(num_cpus=2),
        views=ViewsConfig(view_size=32),
        model=MICRO_MODEL,
        tracking=TrackingConfig(experiment="eval-test"),
    ).resolved()
    uri = cfg.tracking.tracking_uri
    parent = start_run(uri, cfg.tracking.experiment, "pretrain", {"x": 1}, {"abpipe.kind": "pretrain"})
    meta = {"config": cfg.to_dict(), "step": 7, "mlflow_run_id": parent}
    ckpt = save_checkpoint(tmp_path / "ckpt", {"student": trained_state, "teacher": trained_state}, meta)
    return cfg, ckpt, parent


def _eval_cfg(cfg: Config, checkpoint, dataset) -> Config:
    return dataclasses.replace(cfg, eval=EvalConfig(checkpoint=str(checkpoint), dataset=str(dataset), image_size=32, batch_size=64))


def test_eval_end_to_end(ray_cluster, digits_folder, pretrain_setup, tmp_path, capsys):
    from pipeline.eval.job import run_eval

    cfg, ckpt, parent = pretrain_setup
    result = run_eval(_eval_cfg(cfg, ckpt, digits_folder))
    print(result)
    m = result["metrics"]
    assert set(m) >= {"knn_top1", "knn_top5", "linear_top1", "random_init/knn_top1", "random_init/linear_top1"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert result["n_train"] + result["n_test"] == 300 and result["skipped"] == {}
    # chance is 0.1; the trained encoder must clearly beat the random init it started from
    assert m["knn_top1"] > 0.6 and m["linear_top1"] > 0.6, m
    assert m["knn_top1"] > m["random_init/knn_top1"] + 0.3, m

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "eval" and run.info.status == "FINISHED"
    assert run.data.tags["abpipe.parent_run_id"] == parent == run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["abpipe.checkpoint_step"] == "7"
    assert run.data.metrics["knn_top1"] == pytest.approx(m["knn_top1"])
    assert run.data.params["eval.knn_k"] == "20"
    assert {a.path for a in client.list_artifacts(result["run_id"])} >= {"results.md", "results.csv"}
    assert "knn_top1" in capsys.readouterr().out


def test_eval_by_run_id_downloads_artifact_and_skips_bad_images(ray_cluster, digits_folder, pretrain_setup, tmp_path):
    """The run's local path is gone, so the artifact is downloaded; a corrupt image is counted."""
    from pipeline.eval.job import run_eval

    cfg, ckpt, parent = pretrain_setup
    client = MlflowClient(cfg.tracking.tracking_uri)
    client.log_artifact(parent, str(ckpt / "state.pt"), "checkpoints/step_00000007")
    client.log_artifact(parent, str(ckpt / "meta.json"), "checkpoints/step_00000007")
    client.set_tag(parent, "abpipe.checkpoint_artifact", "checkpoints/step_00000007")
    client.set_tag(parent, "abpipe.checkpoint_path", str(tmp_path / "gone"))

    data = tmp_path / "digits"
    shutil.copytree(digits_folder, data)
    (data / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")  # corrupt/truncated
    (data / "5" / "notes.png").write_text("not an image at all")  # not_image
    (data / "3" / ".hidden.png").write_bytes(b"junk")  # hidden: not listed at all
    result = run_eval(_eval_cfg(cfg, parent, data))
    assert sum(result["skipped"].values()) == 2 and result["skipped"]["not_image"] == 1, result["skipped"]
    assert result["n_train"] + result["n_test"] == 300
    assert result["checkpoint"] == f"runs:/{parent}/checkpoints/step_00000007"
    run = client.get_run(result["run_id"])
    assert run.data.tags["abpipe.parent_run_id"] == parent
    assert run.data.metrics["skipped_not_image"] == 1
    assert run.data.tags["abpipe.checkpoint_path"] == result["checkpoint"]
    assert result["metrics"]["knn_top1"] > 0.6


def test_bad_checkpoints_raise_checkpoint_error(ray_cluster, digits_folder, pretrain_setup, tmp_path):
    from pipeline.eval.job import run_eval

    cfg, ckpt, _ = pretrain_setup
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        run_eval(_eval_cfg(cfg, missing, digits_folder))
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a run"):
        run_eval(_eval_cfg(cfg, "0" * 32, digits_folder))
    (ckpt / "state.pt").write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "state.pt"))):
        run_eval(_eval_cfg(cfg, ckpt, digits_folder))


def test_ray_features_match_in_process(ray_cluster, digits_folder, pretrain_setup):
    """Ray Data may reorder blocks; rows must still come back aligned with their labels, in order."""
    from pipeline.eval.features import (
        extract_features,
        features_in_process,
        load_and_resize,
    )
    from pipeline.eval.job import list_labelled_folder
    from pipeline.models.checkpoint import load_frozen_model

    _, ckpt, _ = pretrain_setup
    items = list_labelled_folder(str(digits_folder))[::7]
    items.insert(3, {"input": str(digits_folder / "missing.png"), "label": "0"})
    feats, labels, skipped = extract_features(str(ckpt), items, image_size=32, batch_size=8, max_actors=1)
    good = [it for it in items if "missing" not in it["input"]]
    assert skipped == {"missing": 1} and labels == [it["label"] for it in good]
    model, _ = load_frozen_model(ckpt)
    expected = features_in_process(model, np.stack([load_and_resize(it["input"], 32) for it in good]))
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_resolve_checkpoint_by_run_id_prefers_local_path(pretrain_setup, tmp_path):
    from pipeline.eval.job import resolve_checkpoint

    cfg, ckpt, parent = pretrain_setup
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    client.set_tag(parent, "abpipe.checkpoint_path", str(ckpt))
    assert resolve_checkpoint(parent, uri, str(tmp_path / "dl")) == (str(ckpt), parent, str(ckpt))
    client.set_tag(parent, "abpipe.checkpoint_path", str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match=f"run {parent}.*no abpipe.checkpoint_artifact"):
        resolve_checkpoint(parent, uri, str(tmp_path / "dl"))
