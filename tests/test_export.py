"""`abpipe export`: every method's encoder out as timm safetensors + config.json + model card, loaded
back strictly through timm (three ways) with features equal to the objective's own encoder, bad input
as one error line, and the export registered as an MLflow model version whose files load. The
text-tower methods' exports also carry the text tower and the image embedding: a fresh interpreter
without abpipe runs the model card's zero-shot code on PNGs and scores as abpipe's own towers do."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from pipeline.checkpoints import save_checkpoint
from pipeline.cli import main
from pipeline.config import Config, ViewsConfig
from pipeline.export import (
    PARITY_ATOL,
    ExportError,
    encoder_features,
    export_checkpoint,
    load_exported,
    load_exported_towers,
)
from pipeline.objectives.registry import OBJECTIVES, build_objective
from tests.micro import MICRO_MODEL
from tests.test_objectives_ssl import method_config
from tests.test_objectives_text import text_config

FIGURES: dict[str, float] = {}  # method/weights/loader -> max abs feature diff, method -> tensors (printed with -s)
TEXT_METHODS = ("clip", "slip", "silc", "ab_clip")
WEIGHTS = ("teacher", "student")  # what `abpipe export --weights` takes
TEXT_FILES = ("text.safetensors", "image_head.safetensors")


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
    for weights in WEIGHTS:
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
        has_text = name in TEXT_METHODS
        assert all((out / f).exists() == has_text for f in TEXT_FILES) and ("text" in config) == has_text
        assert ("## Zero-shot classification" in card) == has_text
        assert (f"None: `{name}` trains no text tower" in card) == (not has_text)
        assert (result.text is not None) == has_text
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


# ----------------------------------------------------------------------------------------- text towers

CLASSES = ("red square", "green circle", "blue triangle")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} on a plain background.")
CHECK_SCRIPT = Path(__file__).with_name("export_zero_shot_check.py")


def write_shape_pngs(folder: Path, per_class: int = 2, size: int = 64) -> tuple[list[str], list[int]]:
    """Real PNG files: a coloured shape per class on a noisy background, at twice the model's input size
    (so the image side's resize runs)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        for k in range(per_class):
            background = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            lo, hi = int(rng.integers(4, 16)), int(rng.integers(44, 60))
            colour = {"red square": (220, 30, 30), "green circle": (30, 200, 40), "blue triangle": (40, 60, 230)}[name]
            if name == "red square":
                draw.rectangle([lo, lo, hi, hi], fill=colour)
            elif name == "green circle":
                draw.ellipse([lo, lo, hi, hi], fill=colour)
            else:
                draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=colour)
            path = folder / f"{label}_{k}.png"
            image.save(path)
            paths.append(str(path))
            labels.append(label)
    return paths, labels


def _text_objective(name: str):
    """A text-tower method with every weight off its init (text tower, projection / decoder, scale) and
    the student off its EMA teacher."""
    cfg, objective = trained_objective(name)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in objective.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return cfg, objective


def run_check_script(spec: dict, tmp_path: Path) -> dict:
    """tests/export_zero_shot_check.py in a fresh interpreter, in an empty folder (nothing of abpipe on
    its path); returns its JSON summary."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    work = tmp_path / "user"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), str(tmp_path / "spec.json")],
        cwd=work,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_exports(tmp_path_factory) -> dict:
    """Every text-tower method's checkpoint exported with both weights, and ONE fresh interpreter running
    tests/export_zero_shot_check.py over all the exports (a fresh process costs seconds; its checks are
    per export folder, so one run serves every method)."""
    tmp_path = tmp_path_factory.mktemp("text_exports")
    methods, exports = {}, []
    for name in TEXT_METHODS:
        cfg, objective = _text_objective(name)
        ckpt = save_like_the_loop(objective, cfg, tmp_path / name / "ckpt")
        results = {w: export_checkpoint(ckpt, tmp_path / name / f"out-{w}", w) for w in WEIGHTS}
        index = {w: len(exports) + i for i, w in enumerate(WEIGHTS)}  # its <out>/<i>.npz
        exports += [results[w].out for w in WEIGHTS]
        methods[name] = {"cfg": cfg, "objective": objective, "ckpt": ckpt, "results": results, "index": index}
    paths, labels = write_shape_pngs(tmp_path / "images")
    out_dir = tmp_path / "scores"
    out_dir.mkdir()
    spec = {
        "exports": exports,
        "images": paths,
        "labels": labels,
        "classnames": list(CLASSES),
        "templates": list(TEMPLATES),
        "out": str(out_dir),
    }
    start = time.perf_counter()
    summary = run_check_script(spec, tmp_path)
    FIGURES["zero_shot_script_s"] = round(time.perf_counter() - start, 1)
    return {"methods": methods, "summary": summary, "paths": paths, "labels": labels, "out": out_dir}


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_text_tower_export_scores_zero_shot_without_abpipe_as_abpipes_towers(name, text_exports):
    from pipeline.eval.features import load_and_resize
    from pipeline.eval.zero_shot import class_embeddings, zero_shot_metrics
    from pipeline.models.ab_model import images_to_float
    from pipeline.objectives.towers import load_towers

    mine = text_exports["methods"][name]
    cfg, objective, ckpt, results = mine["cfg"], mine["objective"], mine["ckpt"], mine["results"]
    for w, result in results.items():
        out = Path(result.out)
        section = json.loads((out / "config.json").read_text())["text"]
        assert section["tokenizer"] == cfg.views.text.tokenizer and section["context_length"] == 16
        assert section["embed_dim"] == cfg.model.proj_dim and section["text_cfg"]["width"] == 32
        assert section["image"]["embedding"] == ("ab_decoder" if name == "ab_clip" else "projection")
        assert max(result.text["max_abs_diff"].values()) <= PARITY_ATOL
        # SiLC's EMA teacher is the DINO branch's: its zero-shot image side is the student encoder, carried beside
        beside = name == "silc" and w == "teacher"
        assert (out / "image_encoder.safetensors").exists() == beside
        assert section["image"]["encoder"] == ("image_encoder.safetensors" if beside else "model.safetensors")
        if beside:
            own = load_file(str(out / "image_encoder.safetensors"))
            student = objective.encoders()["student"].state_dict()
            assert own.keys() == student.keys() and all(torch.equal(own[k], v) for k, v in student.items())

    assert text_exports["summary"]["pipeline_imported"] is False
    paths, labels, out_dir = text_exports["paths"], text_exports["labels"], text_exports["out"]
    size = cfg.views.view_size
    uint8 = np.stack([load_and_resize(p, size, "crop") for p in paths])  # the eval job's own image reading
    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    embeddings = {}
    for w in WEIGHTS:
        got = np.load(out_dir / f"{mine['index'][w]}.npz")
        towers, _ = load_towers(ckpt, w)
        with torch.no_grad():
            x = images_to_float(torch.from_numpy(uint8))
            z_img = towers.embed_images(x)
            z_classes = class_embeddings(towers, CLASSES, TEMPLATES)
            tokens = towers.tokenize(prompts)
            z_prompts = towers.embed_texts(tokens)
        logits = towers.logit_scale * z_img @ z_classes.T
        metrics = zero_shot_metrics(z_img, z_classes, np.asarray(labels))
        assert np.array_equal(got["tokens"], tokens.numpy()), "the export's tokenizer is the run's"
        diffs = {
            "input": float(np.abs(got["input"] - x.numpy()).max()),
            "image": float(np.abs(got["z_img"] - z_img.numpy()).max()),
            "prompts": float(np.abs(got["z_prompts"] - z_prompts.numpy()).max()),
            "classes": float(np.abs(got["classes"] - z_classes.numpy()).max()),
            "logits": float(np.abs(got["logits"] - logits.numpy()).max()),
        }
        FIGURES.update({f"{name}/{w}/zero_shot/{k}": v for k, v in diffs.items()})
        assert max(diffs.values()) <= PARITY_ATOL, (w, diffs)
        assert np.array_equal(got["pred"], logits.argmax(-1).numpy())
        assert float(got["top1"]) == pytest.approx(metrics["zero_shot_top1"], abs=1e-12)
        FIGURES[f"{name}/{w}/zero_shot/top1"] = metrics["zero_shot_top1"]
        embeddings[w] = got["z_img"]
    if name == "ab_clip":  # the decoder + head follow --weights (EMA teacher vs student)
        assert np.abs(embeddings["teacher"] - embeddings["student"]).max() > 1e-3


def test_text_side_bad_input_is_a_clear_error(tmp_path):
    cfg, objective = trained_objective("simclr")
    export_checkpoint(save_like_the_loop(objective, cfg, tmp_path / "simclr"), tmp_path / "simclr-out")
    with pytest.raises(ExportError, match="no text tower in this export"):
        load_exported_towers(tmp_path / "simclr-out")

    cfg, objective = trained_objective("clip")
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "clip")
    export_checkpoint(ckpt, tmp_path / "clip-out")
    text = load_file(str(tmp_path / "clip-out" / "text.safetensors"))
    text.pop("ln_final.weight")
    save_file(text, str(tmp_path / "clip-out" / "text.safetensors"))
    with pytest.raises(ExportError, match="text.safetensors in open_clip's text tower.*1 missing: ln_final.weight"):
        load_exported_towers(tmp_path / "clip-out")

    state = torch.load(Path(ckpt) / "state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "objective"}, Path(ckpt) / "state.pt")
    with pytest.raises(ExportError, match="clip has a text tower, but it cannot be exported.*no objective state"):
        export_checkpoint(ckpt, tmp_path / "clip-out-2")
    assert not (tmp_path / "clip-out-2").exists()


def teardown_module(module):
    if FIGURES:
        print("\nexport parity, max abs diff:", json.dumps(FIGURES, indent=1))
