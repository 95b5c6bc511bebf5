"""Config loading: dotted overrides that YAML would misread are refused with the fix, not run silently."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config


def test_a_mapping_written_without_spaces_is_refused_with_the_fix():
    # YAML reads {depth:4} as the key "depth:4" with no value; timm would then drop it silently
    with pytest.raises(ConfigError, match=r"model.encoder_kwargs: .*write \{depth: 4\} \(a space after the colon\)"):
        load_config(None, ["model.encoder_kwargs={depth:4,embed_dim:96}"])
    assert load_config(None, ["model.encoder_kwargs={depth: 4, embed_dim: 96}"]).model.encoder_kwargs == {
        "depth": 4,
        "embed_dim": 96,
    }


def test_dotted_keys_into_a_mapping_build_it_together():
    cfg = load_config(None, ["model.text_kwargs.width=128", "model.text_kwargs.layers=2"])
    assert cfg.model.text_kwargs == {"width": 128, "layers": 2}


def test_scenes_output_defaults_under_the_root(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}", "scenes.objects=digits"]).resolved()
    assert cfg.scenes.output == str(tmp_path / "data" / "scenes_digits")
