"""The smallest model config the tests train: 1-layer, 48-wide ViT on 32 px views (fast on CPU); and
empty MLflow sqlite stores copied from one migrated per test process."""

from __future__ import annotations

import os
import shutil

from pipeline.config import ModelConfig

MICRO_MODEL = ModelConfig(
    encoder="vit_tiny_patch16_224",
    encoder_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2},
    decoder_depth=1,
    decoder_heads=2,
    proj_dim=32,
    proj_hidden_dim=64,
)

_STORE_TEMPLATE: list[str] = []  # path of this process's migrated, empty sqlite store


def sqlite_store(directory: str | os.PathLike) -> str:
    """`sqlite:///<directory>/mlflow.db` (the store `Config.resolved()` gives a root), a new empty store.

    Creating one runs MLflow's schema migrations (~1 s idle, several on a busy host); this copies an empty
    store migrated once per test process instead (~0.05 s). Experiments are created in the copy as in a
    fresh store (pipeline.tracking.ensure_experiment puts their artifacts next to it)."""
    target = os.path.join(os.fspath(directory), "mlflow.db")
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists: sqlite_store makes a new store")
    if not _STORE_TEMPLATE:
        import atexit
        import tempfile

        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="abpipe-mlflow-template-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "mlflow.db")
        MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
        _STORE_TEMPLATE.append(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], target)
    return f"sqlite:///{target}"
