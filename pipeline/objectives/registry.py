"""Name -> pretraining method. `objective.name` in the config picks one; every method trains on
the same data path and budget through the same loop, so comparisons between them are fair."""

from __future__ import annotations

import importlib

import torch

from pipeline.config import Config, ConfigError
from pipeline.objectives.base import Objective

# name -> "module:Class", imported lazily (a method's extra dependencies load only when used)
OBJECTIVES: dict[str, str] = {
    "ab_simclr": "pipeline.objectives.ab_simclr:ABSimCLR",
    "clip": "pipeline.objectives.clip:CLIP",
    "slip": "pipeline.objectives.slip:SLIP",
    "ab_clip": "pipeline.objectives.ab_clip:ABCLIP",
    "simclr": "pipeline.objectives.simclr:SimCLR",
    "dino": "pipeline.objectives.dino:DINO",
    "mae": "pipeline.objectives.mae:MAE",
    "silc": "pipeline.objectives.silc:SiLC",
}


def register(name: str, target: str) -> None:
    OBJECTIVES[name] = target


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown method {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_objective(cfg: Config) -> Objective:
    """The method's modules, initialised from `train.seed` (identical on every worker).

    Each method builds its ViT encoder first after seeding, so the random-init reference in the
    eval job (`pipeline.models.encoder.build_encoder` after the same seed) is the exact encoder the
    run started from.
    """
    cls = objective_class(cfg.objective.name)
    torch.manual_seed(cfg.train.seed)
    objective = cls(cfg)
    objective.check_views()
    return objective
