"""`abpipe export`: every method's encoder out as timm safetensors + config.json + model card, loaded
back strictly through timm (three ways) with features equal to the objective's own encoder, bad input
as one error line, and the export registered as an MLflow model version whose files load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import save_checkpoint
from pipeline.cli import main
from pipeline.config import Config, ViewsConfig
from pipeline.export import PARITY_ATOL, ExportError, encoder_features, export_checkpoint, load_exported
from pipeline.objectives.registry import OBJECTIVES, build_objective
from tests.micro import MICRO_MODEL
from tests.test_objectives_ssl import method_config
from tests.test_objectives_text import text_config

FIGURES: dict[str, float] = {}  # method/weights/loader -> max abs feature diff, method -> tensors (printed with -s)


def micro_method_config(name: str) -> Config:
    """The smallest config each method builds with (as its own objective tests use)."""
    if name == "ab_simclr":
        return Config(model=MICRO_MODEL, views=ViewsConfig(num_views=3, annotation_views=2, view_size=32))
    if name in ("clip", "slip", "ab_clip"):
        return text_config(name)
    return method_config(name)


def save_like_the_loop(objective, cfg: Config, directory, step: int = 7, run_id: str | None = None) -> str:
    """A checkpoint with the keys the training loop writes (objective + both bare encoders)."""
    encoders = objective.encoders()
    state = {
        "objective": objective.state_dict(),
        "encoder_student": encoders["student"].state_dict(),
        "encoder_teacher": encoders["teacher"].state_dict(),
    }
    meta = {"step": step, "views_seen": step * 40, "mlflow_run_id": run_id, "config": cfg.to_dict(), "world_size": 1}
    return str(save_checkpoint(directory, state, meta))


def trained_objective(name: str):
    """The method's objective with its student moved off the EMA teacher (as after a few steps)."""
    cfg = micro_method_config(name)
    objective = build_objective(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in objective.encoders()["student"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return cfg, objective.eval()


def _via_plain_safetensors(directory):
    """What a user without abpipe does: rebuild from config.json, load the tensors strictly."""
    import timm

    cfg = json.loads((directory / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()


def _via_local_dir(directory):
    import timm

    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_export_loads_strictly_and_matches_the_objectives_encoder(name, tmp_path):
    assert len(OBJECTIVES) == 8
    cfg, objective = trained_objective(name)
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    exported = {}
    for weights in ("teacher", "student"):
        out = tmp_path / f"out-{weights}"
        result = export_checkpoint(ckpt, out, weights)
        reference = objective.encoders()[weights]
        n = len(reference.state_dict())
        assert result.tensors == n == len(load_file(str(out / "model.safetensors")))
        FIGURES[f"{name}/tensors"] = n
        ref_tokens, ref_pooled = encoder_features(reference, images)
        overlay_model, loaded = load_exported(out)
        assert loaded == n
        for how, model in (
            ("overlay", overlay_model),
            ("plain", _via_plain_safetensors(out)),
            ("local-dir", _via_local_dir(out)),
        ):
            tokens, pooled = encoder_features(model, images)
            diff = max((tokens - ref_tokens).abs().max().item(), (pooled - ref_pooled).abs().max().item())
            assert diff <= PARITY_ATOL, (how, diff)
            FIGURES[f"{name}/{weights}/{how}"] = diff
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == cfg.model.encoder and config["model_args"]["num_classes"] == 0
        assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and config["pretrained_cfg"]["input_size"] == [
            3,
            32,
            32,
        ]
        card = (out / "README.md").read_text()
        assert f"`{cfg.objective.name}`" in card and f"{n} of {n} tensors" in card
        exported[weights] = load_file(str(out / "model.safetensors"))
    has_teacher = getattr(objective, "teacher_encoder", None) is not None
    differs = any(not torch.equal(exported["teacher"][k], v) for k, v in exported["student"].items())
    assert differs == has_teacher, "--weights picks the teacher or the student"


def test_a_checkpoint_that_does_not_fit_the_timm_model_is_refused_naming_keys(tmp_path):
    cfg, objective = trained_objective("simclr")
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    teacher = dict(state["encoder_teacher"])
    teacher.pop("blocks.0.attn.qkv.weight")
    teacher["blocks.0.extra.weight"] = torch.zeros(1)
    teacher["pos_embed"] = torch.zeros(1, 5, 48)
    torch.save({**state, "encoder_teacher": teacher}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, tmp_path / "out", "teacher")
    message = str(err.value)
    assert "1 missing: blocks.0.attn.qkv.weight" in message and "1 unexpected: blocks.0.extra.weight" in message
    assert "pos_embed (1, 5, 48) vs (1, 17, 48)" in message
    assert not (tmp_path / "out").exists(), "nothing half-written"


def _export_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main(["export", *args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_is_one_error_line_and_a_nonzero_exit(tmp_path, capsys):
    from pipeline.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    no_ckpt_run = start_run(uri, "e", "r", {})
    (tmp_path / "not_a_checkpoint").mkdir()
    cases = {
        str(tmp_path / "missing"): "checkpoint directory not found",
        str(tmp_path / "not_a_checkpoint"): "not an abpipe checkpoint (no meta.json)",
        no_ckpt_run: f"run {no_ckpt_run}: no local checkpoint",
    }
    capsys.readouterr()  # MLflow's own lines from creating the store above
    for ref, expected in cases.items():
        code, err = _export_cli(capsys, ref, "--out", str(tmp_path / "out"), f"tracking.tracking_uri={uri}")
        lines = err.strip().splitlines()
        assert (
            code == 1
            and len(lines) == 1
            and lines[0].startswith("abpipe: error: export failed:")
            and expected in lines[0]
        ), err
    cfg, objective = trained_objective("simclr")
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, err = _export_cli(capsys, ckpt, "--out", str(tmp_path / "full"))
    assert code == 1 and "exists and is not an empty folder" in err


def test_export_by_run_id_is_registered_with_probe_results_in_its_card(tmp_path, capsys):
    """Pretraining run + checkpoint + an eval run tagged as `abpipe eval` tags them, in one sqlite store."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunLogger, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, objective = trained_objective("ab_simclr")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name="tiny"))
    run_id = start_run(uri, "abpipe", "tiny", cfg.flat(), tags={"abpipe.kind": "pretrain"})
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt", step=7, run_id=run_id)
    RunLogger(uri, run_id).tags({"abpipe.checkpoint_path": ckpt})
    eval_tags = {
        "abpipe.kind": "eval",
        "abpipe.parent_run_id": run_id,
        "abpipe.task": "digits",
        "abpipe.checkpoint_step": "7",
    }
    eval_run = start_run(uri, "abpipe", "eval/digits", {}, tags=eval_tags)
    RunLogger(uri, eval_run).metrics({"linear_top1": 0.8125, "random_init/linear_top1": 0.25, "n_train": 100.0}, 7)

    code = main(["export", "--json", run_id, "--out", str(tmp_path / "out"), f"tracking.tracking_uri={uri}"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["registered"]["name"] == "abpipe-tiny" and result["registered"]["version"] == "1"

    client = MlflowClient(uri)
    version = client.get_model_version("abpipe-tiny", "1")
    assert version.run_id == run_id and version.tags["abpipe.weights"] == "teacher"
    assert {a.path for a in client.list_artifacts(run_id, "export/teacher")} == {
        f"export/teacher/{f}" for f in ("README.md", "config.json", "model.safetensors")
    }
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("abpipe-tiny", "1"), dst_path=str(tmp_path / "dl")
    )
    model, count = load_exported(local)
    teacher = objective.encoders()["teacher"].state_dict()
    assert count == len(teacher) and all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())
    card = Path(local, "README.md").read_text()
    assert "| digits | 7 (this export) | linear_top1 | 0.8125 | 0.2500 |" in card and "| n_train |" not in card

    main(
        [
            "export",
            "--json",
            run_id,
            "--out",
            str(tmp_path / "out2"),
            "--weights",
            "student",
            f"tracking.tracking_uri={uri}",
        ]
    )
    assert json.loads(capsys.readouterr().out)["registered"]["version"] == "2"


def teardown_module(module):
    if FIGURES:
        print("\nexport parity, max abs diff:", json.dumps(FIGURES, indent=1))
