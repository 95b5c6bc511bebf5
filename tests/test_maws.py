"""MAWS staging (`train.init_from`): an MAE run's encoder starts an AB run, student and teacher,
with position embeddings resampled when the patch grid differs and lineage recorded in MLflow."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoints import file_sha256, save_checkpoint
from pipeline.config import Config, ConfigError, ModelConfig, ObjectiveConfig, TrainConfig, ViewsConfig
from pipeline.objectives.registry import build_objective
from pipeline.train.init_from import adapt_position_embedding, initialise_encoders, resolve_init_source
from tests.micro import MICRO_MODEL
from tests.test_objectives_ssl import MICRO_MAE


def mae_checkpoint(directory, view_size: int = 32, model: ModelConfig = MICRO_MODEL, seed: int = 7) -> str:
    """A real MAE objective's encoder saved the way the loop saves it."""
    cfg = Config(
        model=model,
        views=ViewsConfig(num_views=1, annotation_views=0, view_size=view_size),
        objective=ObjectiveConfig(name="mae", mae=MICRO_MAE),
        train=TrainConfig(seed=seed),
    )
    mae = build_objective(cfg)
    state = {
        "objective": mae.state_dict(),
        "encoder_student": mae.encoder.state_dict(),
        "encoder_teacher": mae.encoder.state_dict(),
    }
    save_checkpoint(directory, state, {"step": 5, "views_seen": 40, "mlflow_run_id": None, "config": cfg.to_dict()})
    return str(directory)


def ab_config(view_size: int = 32) -> Config:
    return Config(model=MICRO_MODEL, views=ViewsConfig(num_views=3, annotation_views=2, view_size=view_size))


def test_position_embedding_resampled_to_a_new_grid():
    """4x4 -> 6x6 grid: class token kept, patch part = a bicubic resize of the row-major grid (timm's antialiased
    kernel)."""
    encoder = build_objective(ab_config(48)).student_encoder  # patch 8: 6x6
    old = torch.randn(1, 1 + 16, 48)
    got = adapt_position_embedding({"pos_embed": old}, encoder, "ckpt")["pos_embed"]
    assert got.shape == (1, 1 + 36, 48)
    assert torch.equal(got[:, 0], old[:, 0])
    grid = old[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    want = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
        .permute(0, 2, 3, 1)
        .reshape(1, 36, 48)
    )
    assert torch.allclose(got[:, 1:], want, atol=1e-5)


@pytest.mark.parametrize("view_size", [32, 48])
def test_mae_encoder_initialises_student_and_teacher_heads_stay_fresh(tmp_path, view_size):
    source = resolve_init_source(
        mae_checkpoint(tmp_path / "mae"), "sqlite:///" + str(tmp_path / "unused.db"), str(tmp_path / "dl")
    )
    assert (
        source.sha256 == file_sha256(tmp_path / "mae" / "state.pt") and source.step == 5 and source.objective == "mae"
    )
    mae_weights = torch.load(tmp_path / "mae" / "state.pt", weights_only=True)["encoder_student"]

    ab = build_objective(ab_config(view_size))
    fresh = build_objective(ab_config(view_size))  # same seed: what the heads were before
    assert initialise_encoders(ab, source) == 2
    for encoder in (ab.student.encoder, ab.teacher.encoder):
        state = encoder.state_dict()
        for key, value in mae_weights.items():
            if key == "pos_embed" and view_size != 32:
                assert state[key].shape == (1, 1 + (view_size // 8) ** 2, 48)
            else:
                assert torch.equal(state[key], value), key
    for name, value in fresh.student.decoder.state_dict().items():
        assert torch.equal(ab.student.decoder.state_dict()[name], value), name
    assert not torch.equal(
        fresh.student.encoder.blocks[0].attn.qkv.weight, ab.student.encoder.blocks[0].attn.qkv.weight
    )


def test_bad_init_from_is_a_clear_config_error(tmp_path):
    uri = "sqlite:///" + str(tmp_path / "m.db")
    with pytest.raises(ConfigError, match=r"train\.init_from: .*not-here"):
        resolve_init_source(str(tmp_path / "not-here"), uri, str(tmp_path / "dl"))

    wide = dataclasses.replace(MICRO_MODEL, encoder_kwargs={**MICRO_MODEL.encoder_kwargs, "embed_dim": 64})
    source = resolve_init_source(mae_checkpoint(tmp_path / "wide", model=wide), uri, str(tmp_path / "dl"))
    with pytest.raises(ConfigError, match=r"train\.init_from: .*wide.* embed_dim 64, this run's encoder 48"):
        initialise_encoders(build_objective(ab_config()), source)
    with pytest.raises(ConfigError, match=r"train\.init_weights"):
        initialise_encoders(build_objective(ab_config()), source, which="ema")

    save_checkpoint(tmp_path / "no_encoder", {"objective": {}}, {"step": 1, "config": ab_config().to_dict()})
    bare = resolve_init_source(str(tmp_path / "no_encoder"), uri, str(tmp_path / "dl"))
    with pytest.raises(ConfigError, match=r"train\.init_from: .*no_encoder.*no 'teacher' encoder weights"):
        initialise_encoders(build_objective(ab_config()), bare)


@pytest.mark.timeout(600)
def test_mae_run_then_ab_run_from_its_mlflow_run_id(ray_cluster, digit_shards, tmp_path):
    """Stage 1: MAE, in-process, logging its checkpoint to MLflow. Stage 2: AB_SimCLR through Ray
    Train with `train.init_from=<MAE run id>` at lr 0, so its final encoders must still be the MAE
    encoder, and its MLflow run must name the parent run and the exact weights file."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoints import read_meta
    from pipeline.tracking import start_run
    from pipeline.train.loop import train
    from pipeline.train.session import LocalSession
    from pipeline.train.trainer import run_pretrain
    from tests.test_objectives_ssl import fixed_batch
    from tests.test_train import micro_config

    base = micro_config(tmp_path, digit_shards, steps=2)
    mae_cfg = dataclasses.replace(
        base,
        views=dataclasses.replace(base.views, num_views=1, annotation_views=0),
        objective=ObjectiveConfig(name="mae", mae=MICRO_MAE),
        # not the AB run's random init
        train=dataclasses.replace(base.train, total_views=2 * 8, run_name="mae", seed=5),
    )
    mae_run = start_run(
        mae_cfg.tracking.tracking_uri, mae_cfg.tracking.experiment, "mae", mae_cfg.flat(), {"abpipe.kind": "pretrain"}
    )
    train(mae_cfg, LocalSession({"train": [fixed_batch()] * 2}), mae_run)
    client = MlflowClient(mae_cfg.tracking.tracking_uri)
    artifact = client.get_run(mae_run).data.tags["abpipe.checkpoint_artifact"]
    logged = mlflow.artifacts.download_artifacts(
        run_id=mae_run,
        artifact_path=artifact,
        dst_path=str(tmp_path / "mine"),
        tracking_uri=mae_cfg.tracking.tracking_uri,
    )
    mae_encoder = torch.load(f"{logged}/state.pt", weights_only=True)["encoder_student"]

    ab_cfg = dataclasses.replace(
        base, train=dataclasses.replace(base.train, lr=0.0, min_lr=0.0, init_from=mae_run, run_name="ab_from_mae")
    )
    result = run_pretrain(ab_cfg)
    assert read_meta(result["checkpoint"])["step"] == 2
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["abpipe.parent_run_id"] == mae_run and tags["abpipe.init_from"] == mae_run
    assert tags["abpipe.init_checkpoint_sha256"] == file_sha256(f"{logged}/state.pt")
    assert tags["abpipe.init_objective"] == "mae" and tags["abpipe.init_checkpoint_step"] == "2"
    state = torch.load(f"{result['checkpoint']}/state.pt", weights_only=True)
    for which in ("encoder_student", "encoder_teacher"):
        assert set(state[which]) == set(mae_encoder)
        assert all(torch.equal(state[which][k], v) for k, v in mae_encoder.items()), which
