"""The random-init reference an evaluation compares against: the exact encoder a pretraining started from.

It is written as an ordinary checkpoint (pipeline/checkpoints.py) and named by its recipe, so the
feature cache recognises it across runs.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.checkpoints import META_FILE, save_checkpoint
from pipeline.config import Config


def write_random_init(model_cfg: Config, directory: str) -> str:
    """The exact encoder the pretraining started from: every objective builds it first after seeding."""
    import torch

    from pipeline.models.encoder import build_encoder

    if os.path.isfile(os.path.join(directory, META_FILE)):
        return directory
    torch.manual_seed(model_cfg.train.seed)
    state = build_encoder(model_cfg.model, model_cfg.views.view_size).state_dict()
    save_checkpoint(
        directory, {"encoder_teacher": state, "encoder_student": state}, {"config": model_cfg.to_dict(), "step": 0}
    )
    return directory


def random_init_fingerprint(model_cfg: Config) -> str:
    """Names the random-init encoder by its recipe (architecture, input size, seed, library versions)."""
    import timm
    import torch

    from pipeline.eval.cache import digest

    # model keys that change how a step runs, not the weights, stay out (old fingerprints still match)
    model = {k: v for k, v in dataclasses.asdict(model_cfg.model).items() if k not in ("grad_checkpointing",)}
    recipe = {
        "model": model,
        "size": model_cfg.views.view_size,
        "seed": model_cfg.train.seed,
    }
    return "random:" + digest({**recipe, "torch": torch.__version__, "timm": timm.__version__})
