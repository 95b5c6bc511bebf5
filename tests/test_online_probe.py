"""The online probe (train.online_probe): logged on schedule, never changes what pretraining learns,
and its readouts agree with reference computations written independently here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.checkpoints import latest_checkpoint_dir, load_state
from pipeline.config import InputError
from pipeline.data.labelled import read_labelled_folder
from pipeline.data.sample_data import write_digits_folder
from pipeline.tracking import start_run
from pipeline.train.loop import train
from pipeline.train.online_probe import knn_top1, ridge_top1
from pipeline.train.session import LocalSession
from tests.test_train import _batch, micro_config
from tests.test_train_loop import GOOD_BOXES


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits", size=32, per_class=12)


def _run(tmp_path, name: str, probe_root: str = "", every: int = 2, steps: int = 5):
    cfg = micro_config(tmp_path / name, tmp_path, steps=steps, log_every_steps=2, checkpoint_every_steps=100)
    probe = dataclasses.replace(cfg.train.online_probe, root=probe_root, every_steps=every, max_per_class=6)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, online_probe=probe))
    run_id = start_run(cfg.tracking.tracking_uri, "abpipe", name, {})
    metrics = train(cfg, LocalSession({"train": [_batch(GOOD_BOXES)] * steps}, tmp_path / name / "ck"), run_id)
    state = load_state(latest_checkpoint_dir(str(tmp_path / name / "ck"), "local"))
    return cfg, run_id, metrics, state


def test_the_probe_is_logged_on_schedule_and_leaves_training_unchanged(tmp_path, digits_folder):
    _, _, plain_metrics, plain = _run(tmp_path, "plain")
    cfg, run_id, metrics, probed = _run(tmp_path, "probed", str(digits_folder))
    # The same weights, optimiser state and EMA teacher, to the bit: the probe only reads the encoder.
    for part in ("objective", "encoder_student", "encoder_teacher"):
        assert plain[part].keys() == probed[part].keys()
        assert all(torch.equal(plain[part][k], probed[part][k]) for k in plain[part]), part
    assert plain["optimizer"]["state"].keys() == probed["optimizer"]["state"].keys()
    for k, s in plain["optimizer"]["state"].items():
        assert all(torch.equal(s[n], probed["optimizer"]["state"][k][n]) for n in s)
    assert plain_metrics["loss"] == metrics["loss"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    history = client.get_metric_history(run_id, "online/linear_top1")
    assert [m.step for m in history] == [2, 4, 5]  # every 2 steps, and the last
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert [m.step for m in client.get_metric_history(run_id, "online/knn_top1")] == [2, 4, 5]
    assert "online/linear_top1" in metrics and "online/linear_top1" not in plain_metrics


def _reference_ridge(train_x, train_y, test_x, test_y, ridge):
    """Closed-form ridge in numpy, written out: standardise, append a bias column, solve, argmax."""
    mean, std = train_x.mean(0), np.maximum(train_x.std(0, ddof=1), 1e-6)
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    y = np.eye(int(max(train_y.max(), test_y.max())) + 1)[train_y]
    w = np.linalg.lstsq(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ y, rcond=None)[0]
    return float(np.mean((b @ w).argmax(1) == test_y))


def _reference_knn(train_x, train_y, test_x, test_y, k):
    """kNN by a loop over test points: cosine neighbours, votes exp(sim / 0.07)."""
    tn = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    hits = 0
    for x, y in zip(test_x, test_y):
        sims = tn @ (x / np.linalg.norm(x))
        votes = {}
        for i in np.argsort(-sims)[:k]:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + np.exp(sims[i] / 0.07)
        hits += max(votes, key=votes.get) == y
    return hits / len(test_y)


@pytest.mark.parametrize("seed", [0, 1])
def test_readouts_match_reference_computations(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16)) * 1.5
    train_y, test_y = rng.integers(0, 4, 80), rng.integers(0, 4, 40)
    train_x = centres[train_y] + rng.normal(size=(80, 16))
    test_x = centres[test_y] + rng.normal(size=(40, 16))
    t = [torch.from_numpy(v) for v in (train_x, train_y, test_x, test_y)]
    assert ridge_top1(*t, ridge=0.01) == pytest.approx(_reference_ridge(train_x, train_y, test_x, test_y, 0.01))
    assert knn_top1(*t, k=5) == pytest.approx(_reference_knn(train_x, train_y, test_x, test_y, 5))
    assert ridge_top1(*t, ridge=0.01) > 0.5  # well-separated clusters: far above chance (0.25)


def test_labelled_folder_layouts_and_bad_input(tmp_path, digits_folder):
    pooled = read_labelled_folder(str(digits_folder), 24, max_per_class=5, seed=0)
    assert pooled.classes == [str(d) for d in range(10)]
    assert pooled.train_images.shape == (50, 24, 24, 3) and pooled.test_images.shape[1:] == (24, 24, 3)
    assert set(pooled.train_labels.tolist()) == set(range(10))
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="at least 2 class folders"):
        read_labelled_folder(str(tmp_path / "bad"), 24)
    with pytest.raises(InputError, match="no such folder"):
        read_labelled_folder(str(tmp_path / "missing"), 24)
    (tmp_path / "bad" / "b").mkdir()
    (tmp_path / "bad" / "b" / "y.png").write_bytes(b"also not a png")
    with pytest.raises(InputError, match="no readable image"):
        read_labelled_folder(str(tmp_path / "bad"), 24)


def test_a_probe_call_keeps_the_random_stream_and_the_mode(tmp_path, digits_folder):
    from pipeline.models.encoder import build_encoder
    from pipeline.train.online_probe import OnlineProbe

    cfg = micro_config(tmp_path, tmp_path, steps=4)
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, online_probe=dataclasses.replace(cfg.train.online_probe, root=str(digits_folder))
        ),
    )
    probe = OnlineProbe(cfg, total_steps=4, device=torch.device("cpu"))
    encoder = build_encoder(cfg.model, cfg.views.view_size).train()
    before = [p.detach().clone() for p in encoder.parameters()]
    state = torch.random.get_rng_state()
    figures = probe(encoder)
    assert torch.equal(state, torch.random.get_rng_state()) and encoder.training
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    assert set(figures) == {"online/linear_top1", "online/knn_top1", "online/probe_s"}
    assert [probe.due(s) for s in range(1, 5)] == [False, False, False, True]  # every 100 (default), and the last
