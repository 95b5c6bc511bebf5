"""Eval job: probes against references, features + cache against in-process references, and the whole
job (tasks -> Ray Data features -> parallel probe tasks -> MLflow) through real Ray and a real MLflow store."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import CheckpointError, save_checkpoint
from pipeline.config import (
    Config,
    EvalConfig,
    PathsConfig,
    ProbeConfig,
    RayConfig,
    TrackingConfig,
    ViewsConfig,
)
from pipeline.eval.probe_data import CLASSIFICATION, ProbeSplit, TaskInfo
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


def _splits(train_x, train_y, test_x, test_y, n_classes):
    info = TaskInfo("synthetic", CLASSIFICATION, [f"class_{i}" for i in range(n_classes)])
    return (
        ProbeSplit(np.asarray(train_x, np.float32), labels=np.asarray(train_y)),
        ProbeSplit(np.asarray(test_x, np.float32), labels=np.asarray(test_y)),
        info,
    )


def test_knn_matches_reference():
    from pipeline.eval.probes import PROBES, knn_predict

    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(80, 16))
    train_y, test_y = rng.integers(0, 7, 300), rng.integers(0, 7, 80)
    ref = knn_reference(train_x, train_y, test_x, k=20, t=0.07)
    np.testing.assert_array_equal(knn_predict(train_x, train_y, test_x, k=20, temperature=0.07)[:, 0], ref)
    metrics = PROBES["knn"](*_splits(train_x, train_y, test_x, test_y, 7), EvalConfig())
    assert metrics["top1"] == pytest.approx(float((ref == test_y).mean()))
    assert metrics["top1"] <= metrics["top5"] <= 1.0


def test_linear_probe_separable_vs_random_labels():
    from pipeline.eval.probes import PROBES

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(5, 32))
    y = rng.integers(0, 5, 1000)
    x = centres[y] + rng.normal(size=(1000, 32)) + 100.0  # offset: standardisation must handle it
    cfg = EvalConfig(linear_epochs=100)
    good = PROBES["linear"](*_splits(x[:600], y[:600], x[600:], y[600:], 5), cfg)
    assert good["top1"] > 0.97, good
    shuffled = rng.permutation(y)
    noise = PROBES["linear"](*_splits(x[:600], shuffled[:600], x[600:], shuffled[600:], 5), cfg)
    assert noise["top1"] < 0.32, noise  # chance is 0.2
    assert PROBES["linear"](*_splits(x[:600], y[:600], x[600:], y[600:], 5), cfg) == good, "seeded -> deterministic"


# ----------------------------------------------------------------------------------------- cache


def test_feature_cache_keys_roundtrip_and_incomplete_entries(tmp_path):
    from pipeline.eval.cache import CachedFeatures, FeatureCache, make_key

    base = dict(
        model="sha256:abc",
        weights="teacher",
        task="folder",
        root=str(tmp_path),
        split="train",
        inputs=["a.png", "b.png"],
        image_size=32,
        resize="crop",
    )
    key = make_key(**base)
    assert make_key(**base) == key and make_key(**base).id == key.id
    for field, other in (
        ("model", "sha256:abd"),
        ("weights", "student"),
        ("split", "test"),
        ("inputs", ["b.png", "a.png"]),
        ("image_size", 64),
        ("resize", "stretch"),
        ("task", "pets"),
    ):
        assert make_key(**{**base, field: other}).id != key.id, field

    cache = FeatureCache(str(tmp_path / "cache"))
    assert cache.get(key, need_tokens=False) is None
    pooled = np.arange(6, dtype=np.float32).reshape(2, 3)
    folder = cache.put(key, CachedFeatures(pooled, None, np.array([0, 1]), {"missing": 1}))
    got = cache.get(key, need_tokens=False)
    np.testing.assert_array_equal(got.pooled, pooled)
    assert got.skipped == {"missing": 1} and got.kept.tolist() == [0, 1]
    assert cache.get(key, need_tokens=True) is None, "an entry without tokens cannot serve a token request"
    os.remove(os.path.join(folder, "meta.json"))  # a writer killed before the end
    assert cache.get(key, need_tokens=False) is None
    tokens = np.ones((2, 5, 3), np.float16)
    cache.put(key, CachedFeatures(pooled, tokens, np.array([0, 1]), {}))
    both = cache.get(key, need_tokens=True)
    np.testing.assert_array_equal(both.tokens, tokens)
    assert cache.get(key, need_tokens=False).tokens is None
    with open(os.path.join(folder, "pooled.npy"), "wb") as fh:
        fh.write(b"garbage")  # damaged: a miss (re-extract), never a crash
    assert cache.get(key, need_tokens=False) is None


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
    from pipeline.data.sources.image_folder import list_image_folder
    from pipeline.eval.features import load_and_resize
    from pipeline.models.ab_model import build_model, images_to_float

    probe_set = {p.name for p in digits_folder.rglob("*.png")}
    everything = write_digits_folder(tmp_path_factory.mktemp("all_digits"), size=32)
    held_out = [it for it in list_image_folder(str(everything)) if it["input"].rsplit("/", 1)[-1] not in probe_set]
    x = torch.from_numpy(np.stack([load_and_resize(it["input"], 32) for it in held_out]))
    y = torch.tensor([int(it["labels"][0]) for it in held_out])
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


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory) -> Config:
    """One sqlite MLflow store for the module (creating one costs seconds); tests isolate by run ids."""
    root = tmp_path_factory.mktemp("eval_root")
    return Config(
        paths=PathsConfig(root=str(root)),
        ray=RayConfig(num_cpus=2),
        views=ViewsConfig(view_size=32),
        model=MICRO_MODEL,
        tracking=TrackingConfig(experiment="eval-test"),
    ).resolved()


def _pretrain_checkpoint(tmp_path, state, store_cfg):
    """A checkpoint whose meta points at a real (sqlite) pretraining run; a feature cache of its own."""
    from pipeline.tracking import start_run

    cfg = dataclasses.replace(store_cfg, paths=PathsConfig(root=str(tmp_path)))  # feature_cache/ under tmp_path
    uri = cfg.tracking.tracking_uri
    parent = start_run(
        uri, cfg.tracking.experiment, "pretrain", {"x": 1}, {"abpipe.kind": "pretrain", "abpipe.objective": "ab_simclr"}
    )
    meta = {"config": cfg.to_dict(), "step": 7, "mlflow_run_id": parent}
    ckpt = save_checkpoint(tmp_path / "ckpt", {"student": state, "teacher": state}, meta)
    return cfg, ckpt, parent


@pytest.fixture
def pretrain_setup(tmp_path, trained_state, store_cfg):
    """The trained weights' checkpoint: for the tests that extract and probe its features."""
    return _pretrain_checkpoint(tmp_path, trained_state, store_cfg)


@pytest.fixture
def untrained_setup(tmp_path, store_cfg):
    """The same checkpoint and run with random-init weights (no supervised training): for tests that only
    resolve the checkpoint and never read its features."""
    from pipeline.models.ab_model import build_model

    torch.manual_seed(0)
    return _pretrain_checkpoint(tmp_path, build_model(MICRO_MODEL, 32).state_dict(), store_cfg)


def _eval_cfg(cfg: Config, checkpoint, dataset=None, **kwargs) -> Config:
    kwargs.setdefault("linear_epochs", 200)
    ev = EvalConfig(checkpoint=str(checkpoint), dataset=str(dataset or ""), image_size=32, batch_size=64, **kwargs)
    return dataclasses.replace(cfg, eval=ev)


def _cache_files(root) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_eval_end_to_end_then_cached(ray_cluster, digits_folder, pretrain_setup):
    """`eval.dataset` = the folder task; a second eval of the same checkpoint/task reads the feature cache."""
    from pipeline.eval.job import run_eval, summary_rows

    cfg, ckpt, parent = pretrain_setup
    result = run_eval(_eval_cfg(cfg, ckpt, digits_folder))
    res = result["tasks"]["folder"]
    m = res["metrics"]
    assert set(m) >= {"knn_top1", "knn_top5", "linear_top1", "random_init/knn_top1", "random_init/linear_top1"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert res["n_train"] + res["n_test"] == 300 and res["skipped"] == {} and res["cached"] == []
    # chance is 0.1; the trained encoder must clearly beat the random init it started from
    assert m["knn_top1"] > 0.6 and m["linear_top1"] > 0.6, m
    assert m["knn_top1"] > m["random_init/knn_top1"] + 0.3, m
    assert result["metrics"] == m and result["failures"] == {}, "one task: its metrics un-prefixed (demo, study)"

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(res["run_id"])
    assert run.info.run_name == "eval/folder" and run.info.status == "FINISHED"
    assert run.data.tags["abpipe.parent_run_id"] == parent == run.data.tags["mlflow.parentRunId"]
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id, (
        "nested: same experiment as its pretraining run"
    )
    assert run.data.tags["abpipe.checkpoint_step"] == "7" and run.data.tags["abpipe.checkpoint_key"] == f"{parent}@7"
    assert run.data.tags["abpipe.task"] == "folder" and run.data.tags["abpipe.objective"] == "ab_simclr"
    assert run.data.metrics["knn_top1"] == pytest.approx(m["knn_top1"]) and run.data.metrics["features_cached"] == 0.0
    assert run.data.params["eval.knn_k"] == "20"
    assert {a.path for a in client.list_artifacts(res["run_id"])} >= {"results.md", "results.csv", "results.png"}
    header, rows = summary_rows(result)  # the table `abpipe eval` ends with
    assert header == ["task / metric", "pretrained", "random init"] and rows[0][0].startswith("folder (")
    assert ("  knn_top1", m["knn_top1"], m["random_init/knn_top1"]) in rows

    cache_root = os.path.join(cfg.paths.root, "feature_cache")
    assert cfg.paths.root == str(ckpt.parent)
    files = _cache_files(cache_root)
    assert sum(f.endswith("meta.json") for f in files) == 4, files  # {pretrained, random init} x {train, test}
    again = run_eval(_eval_cfg(cfg, ckpt, digits_folder))["tasks"]["folder"]
    assert again["cached"] == ["pretrained", "random"]
    assert _cache_files(cache_root) == files, "a cached eval must not rewrite (re-extract) any feature file"
    assert again["metrics"] == m, "same features, same seeded probes -> same numbers"
    assert client.get_run(again["run_id"]).data.metrics["features_cached"] == 1.0


def test_eval_by_run_id_downloads_artifact_and_skips_bad_images(ray_cluster, digits_folder, pretrain_setup, tmp_path):
    """The run's local path is gone, so the artifact is downloaded; corrupt images are counted per split."""
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
    result = run_eval(_eval_cfg(cfg, parent, data, knn_k=10, probes=["knn"], random_init=False))
    res = result["tasks"]["folder"]
    reasons = {k.split("/", 1)[1]: v for k, v in res["skipped"].items()}
    assert sum(res["skipped"].values()) == 2 and reasons["not_image"] == 1, res["skipped"]
    assert all(k.split("/")[0] in ("train", "test") for k in res["skipped"])
    assert res["n_train"] + res["n_test"] == 300
    assert result["checkpoint"] == f"runs:/{parent}/checkpoints/step_00000007"
    assert set(res["metrics"]) == {"knn_top1", "knn_top5"}, "random_init=False: no reference probes"
    run = client.get_run(res["run_id"])
    assert run.data.tags["abpipe.parent_run_id"] == parent
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("skipped/")) == 2
    assert run.data.tags["abpipe.checkpoint_path"] == result["checkpoint"]
    assert res["metrics"]["knn_top1"] > 0.6


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


def test_bad_task_data_fails_that_task_only(ray_cluster, digits_folder, pretrain_setup, tmp_path):
    """Wrong layout and a class-count mismatch each name the offending path; the good task still finishes."""
    from pipeline.eval.job import EvalError, run_eval
    from tests.task_fixtures import make_folder

    cfg, ckpt, parent = pretrain_setup
    wrong = tmp_path / "resisc"
    (wrong / "NWPU-RESISC45").mkdir(parents=True)  # no class folders inside
    mismatch = tmp_path / "imagenet"
    make_folder(str(mismatch))
    for image in (mismatch / "train" / "n01484850").iterdir():
        image.unlink()  # a class that only the val split has
    roots = {"folder": str(digits_folder), "resisc45": str(wrong), "sun397": str(tmp_path / "absent")}
    with pytest.raises(EvalError) as err:
        run_eval(
            _eval_cfg(
                cfg, ckpt, tasks=["resisc45", "folder", "sun397"], task_roots=roots, probes=["knn"], random_init=False
            )
        )
    failures = err.value.failures
    assert set(failures) == {"resisc45", "sun397"}
    assert str(wrong / "NWPU-RESISC45") in failures["resisc45"] and "TaskFormatError" in failures["resisc45"]
    assert str(tmp_path / "absent") in failures["sun397"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    mine = f"tags.`abpipe.kind` = 'eval' and tags.`abpipe.parent_run_id` = '{parent}'"
    runs = {
        r.data.tags["abpipe.task"]: r
        for r in client.search_runs([client.get_experiment_by_name("eval-test").experiment_id], mine)
    }
    assert runs["folder"].info.status == "FINISHED" and runs["resisc45"].info.status == "FAILED"
    assert str(wrong / "NWPU-RESISC45") in runs["resisc45"].data.tags["abpipe.error"]

    with pytest.raises(EvalError, match=re.escape(str(mismatch)) + ".*class-count mismatch.*n01484850"):
        run_eval(
            _eval_cfg(
                cfg, ckpt, tasks=["folder"], task_roots={"folder": str(mismatch)}, probes=["knn"], random_init=False
            )
        )


def test_box_task_uses_tokens_and_stretch_resize(ray_cluster, pretrain_setup, tmp_path):
    """A box task: whole-image resize, the encoder's tokens reach the decoder and box-linear probes; kNN is
    not run on it."""
    from pipeline.eval.job import run_eval
    from tests.task_fixtures import make_coco

    cfg, ckpt, _ = pretrain_setup
    root = make_coco(str(tmp_path / "coco"))
    probe = ProbeConfig(decoder_depth=1, width=32, heads=2, steps=30, batch_size=8)
    result = run_eval(
        _eval_cfg(
            cfg,
            ckpt,
            tasks=["coco_objects"],
            task_roots={"coco_objects": root},
            probes=["knn", "decoder", "box_linear"],
            probe=probe,
            random_init=False,
        )
    )
    res = result["tasks"]["coco_objects"]
    assert res["kind"] == "box_classification"
    assert set(res["metrics"]) and all(k.startswith(("decoder_", "box_linear_")) for k in res["metrics"]), res[
        "metrics"
    ]
    assert res["metrics"]["box_linear_n_boxes"] == res["metrics"]["decoder_n_boxes"] > 0  # every test box, both probes
    cache_root = os.path.join(cfg.paths.root, "feature_cache", "coco_objects")
    metas = [os.path.join(d, "meta.json") for d, _, fs in os.walk(cache_root) if "meta.json" in fs]
    assert len(metas) == 2
    import json

    assert all(json.load(open(p))["has_tokens"] and json.load(open(p))["key"]["resize"] == "stretch" for p in metas)


def test_ray_features_match_in_process(ray_cluster, digits_folder, pretrain_setup, tmp_path):
    """Ray Data may reorder blocks; rows must still come back aligned with their inputs, in order.
    Pooled features, tokens, and both resize modes against the in-process forward and PIL."""
    from PIL import Image

    from pipeline.data.sources.image_folder import list_image_folder
    from pipeline.eval.features import extract_features, features_in_process, load_and_resize
    from pipeline.models.encoder import load_frozen_model

    _, ckpt, _ = pretrain_setup
    inputs = [it["input"] for it in list_image_folder(str(digits_folder))][::7]
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 50, 3), np.uint8)).save(wide)
    inputs.insert(3, str(digits_folder / "missing.png"))
    inputs.insert(5, str(wide))
    got = extract_features(str(ckpt), inputs, image_size=32, batch_size=8, max_actors=1, tokens=True, resize="stretch")
    good = [p for p in inputs if "missing" not in p]
    assert (
        got.skipped == {"missing": 1}
        and got.dropped == {3: "missing"}
        and got.kept.tolist() == [i for i in range(len(inputs)) if i != 3]
    )
    model, _ = load_frozen_model(ckpt)
    images = np.stack([load_and_resize(p, 32, "stretch") for p in good])
    ref_pooled, ref_tokens = features_in_process(model, images, tokens=True)
    np.testing.assert_allclose(got.pooled["model"], ref_pooled, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        from pipeline.models.ab_model import images_to_float

        direct = model.encode(images_to_float(torch.from_numpy(images))).numpy()
    assert got.tokens["model"].shape == direct.shape == (len(good), 16 + 1, 48)  # 4x4 patches + class token
    np.testing.assert_allclose(got.tokens["model"].astype(np.float32), direct, rtol=1e-2, atol=1e-2)  # float16
    np.testing.assert_allclose(ref_tokens.astype(np.float32), direct, rtol=1e-2, atol=1e-2)
    # resize modes on the wide image: stretch keeps all of it, crop keeps its centre square
    rgb = np.asarray(Image.open(wide).convert("RGB"))
    stretch = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.BICUBIC))
    crop = np.asarray(Image.fromarray(rgb[:, 15:35]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(load_and_resize(str(wide), 32, "stretch"), stretch)
    assert np.abs(load_and_resize(str(wide), 32, "crop").astype(int) - crop).mean() < 3


def test_resolve_checkpoint_by_run_id_prefers_local_path(untrained_setup, tmp_path):
    from pipeline.checkpoints import resolve_checkpoint

    cfg, ckpt, parent = untrained_setup
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    client.set_tag(parent, "abpipe.checkpoint_path", str(ckpt))
    assert resolve_checkpoint(parent, uri, str(tmp_path / "dl")) == (str(ckpt), parent, str(ckpt))
    client.set_tag(parent, "abpipe.checkpoint_path", str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match=f"run {parent}.*no abpipe.checkpoint_artifact"):
        resolve_checkpoint(parent, uri, str(tmp_path / "dl"))
    with pytest.raises(
        CheckpointError, match=f"run {parent}: cannot download checkpoint artifact 'checkpoints/step_9'"
    ):
        resolve_checkpoint(f"runs:/{parent}/checkpoints/step_9", uri, str(tmp_path / "dl"))
