"""Text -> token ids for text annotations, on the CPU crop actors (the trainer only receives int64 ids).

open_clip's bundled BPE tokenizer (`get_tokenizer`), offline for every native open_clip config. It
is the data stage's, not the text tower's: the crop stage and the CLIP-family objectives both use it,
and the data stage must not import models.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.config import ConfigError


def build_tokenizer(name: str, context_length: int):
    """open_clip's bundled tokenizer for model `name` (offline for every native open_clip config)."""
    import open_clip

    if open_clip.get_model_config(name) is None:
        raise ConfigError(
            f"views.text.tokenizer: {name!r} is not an open_clip model config (see open_clip.list_models())"
        )
    return open_clip.get_tokenizer(name, context_length=context_length)


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> np.ndarray:
    """(len(texts), context_length) int64 ids; over-long strings are cut, keeping the end token."""
    if not texts:
        return np.zeros((0, context_length), np.int64)
    return np.asarray(tokenizer(list(texts)), dtype=np.int64)
