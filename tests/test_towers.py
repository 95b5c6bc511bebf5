"""The image and text towers of the text-tower methods, read back from a checkpoint the way the loop
writes it: the loaded towers score exactly as the trained objective's own modules do."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoints import CheckpointError
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import pooled_features
from pipeline.objectives.towers import NoTextTower, load_towers
from tests.test_export import micro_method_config, save_like_the_loop, trained_objective

TEXT_METHODS = ("clip", "slip", "silc", "ab_clip")


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _own_image_embedding(objective, name: str, which: str, x: torch.Tensor) -> torch.Tensor:
    """Each method's z_img written out from its modules (not through image_text_towers)."""
    if name == "ab_clip":
        net = objective.teacher if which == "teacher" else objective.student
        return net.image.embed(x)
    net = objective.net
    return torch.nn.functional.normalize(net.image_projection(pooled_features(net.encoder, x)), dim=-1)


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_loaded_towers_score_as_the_trained_objective(name, tmp_path):
    cfg, objective = trained_objective(name)
    with torch.no_grad():  # move the text tower and the scale off their init too
        for p in objective.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt")
    x = images_to_float(_images())
    for which in ("teacher", "student"):
        towers, loaded_cfg = load_towers(ckpt, which)
        assert loaded_cfg.objective.name == name and towers.method == name
        assert not any(p.requires_grad for p in towers.parameters())
        tokens = towers.tokenize(["a photo of a cat", "a dog"])
        assert tokens.shape == (2, cfg.views.text.context_length) and tokens.dtype == torch.long
        with torch.no_grad():
            z_img, z_txt = towers.embed_images(x), towers.embed_texts(tokens)
            want_img = _own_image_embedding(objective, name, which, x)
            text = (
                objective.teacher.text
                if name == "ab_clip" and which == "teacher"
                else (objective.student.text if name == "ab_clip" else objective.net.text)
            )
            want_txt = text(tokens)
        torch.testing.assert_close(z_img, want_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z_txt, want_txt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z_img.norm(dim=-1), torch.ones(3))
        scale = (
            (
                objective.teacher
                if name == "ab_clip" and which == "teacher"
                else objective.student
                if name == "ab_clip"
                else objective.net
            )
            .log_scale.exp()
            .item()
        )
        assert towers.logit_scale == pytest.approx(scale, rel=1e-6)


def test_ab_clip_teacher_and_student_towers_differ_after_training(tmp_path):
    cfg, objective = trained_objective("ab_clip")  # the student moved off the teacher
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "ckpt")
    x = images_to_float(_images())
    with torch.no_grad():
        teacher = load_towers(ckpt, "teacher")[0].embed_images(x)
        student = load_towers(ckpt, "student")[0].embed_images(x)
    assert (teacher - student).abs().max() > 1e-3


def test_the_registry_knows_which_methods_have_a_text_tower():
    from pipeline.objectives.registry import OBJECTIVES
    from pipeline.objectives.towers import has_text_tower

    assert {name for name in OBJECTIVES if has_text_tower(name)} == set(TEXT_METHODS)


def test_methods_without_a_text_tower_and_bad_checkpoints_say_so(tmp_path):
    cfg = micro_method_config("simclr")
    from pipeline.objectives.registry import build_objective

    ckpt = save_like_the_loop(build_objective(cfg), cfg, tmp_path / "simclr")
    with pytest.raises(NoTextTower, match="simclr.*no text tower"):
        load_towers(ckpt)
    cfg, objective = trained_objective("clip")
    ckpt = save_like_the_loop(objective, cfg, tmp_path / "clip")
    with pytest.raises(ValueError, match="which must be .teacher. or .student."):
        load_towers(ckpt, "ema")
    torch.save({"encoder_student": {}}, tmp_path / "clip" / "state.pt")
    with pytest.raises(CheckpointError, match="no objective state"):
        load_towers(ckpt)
