"""Frozen encoder features for a labelled image list, with Ray Data.

Two stages: CPU tasks read + decode + resize (bad files become rows with a skip reason, so nothing
crashes and nothing is lost uncounted), then a small actor pool that loads each model once and runs
`encoder_features` under `torch.inference_mode()`. Every row carries its item index and label, so
Ray Data may reorder rows freely; the driver sorts by index at the end.

On CPU, Ray Data fuses the decode stage into the actors (same resources): decoding is cheap next
to a ViT forward there. With `use_gpu` the actors ask for a GPU, so decoding stays a separate stage
of CPU tasks that feeds them.

Images are resized the standard eval way: shorter side to `image_size`, then a centre crop
(`PIL.ImageOps.fit`), so the aspect ratio is kept and the whole square the model sees is image.

Checkpoint paths are opened by the actors: on a multi-node cluster they must be on storage every
node can read.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.schema import MISSING, OK, BadImage, decode_rgb


def load_and_resize(path: str, image_size: int) -> np.ndarray:
    """RGB uint8 (S, S, 3): shorter side resized to S, centre-cropped. Raises BadImage."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImage(MISSING, str(exc)) from None
    rgb = decode_rgb(data, draft_to=image_size)
    return np.asarray(ImageOps.fit(Image.fromarray(rgb), (image_size, image_size), Image.BICUBIC))


def _decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    images = np.zeros((len(batch["input"]), image_size, image_size, 3), np.uint8)
    status = []
    for i, path in enumerate(batch["input"]):
        try:
            images[i] = load_and_resize(str(path), image_size)
            status.append(OK)
        except BadImage as exc:
            status.append(exc.reason)
    return {"idx": batch["idx"], "label": batch["label"], "status": np.array(status), "image": images}


def features_in_process(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, D) encoder features, in this process (no Ray)."""
    import torch

    from pipeline.models.ab_model import images_to_float

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            out.append(model.encoder_features(images_to_float(x)).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.embed_dim), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


class _Encoders:
    """Ray Data actor: loads every checkpoint once, then turns image batches into features."""

    def __init__(self, checkpoints: dict[str, str], which: str, use_gpu: bool):
        import torch

        from pipeline.models.checkpoint import load_frozen_model

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.models = {name: load_frozen_model(path, which=which, device=self.device)[0] for name, path in checkpoints.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == OK
        out = {k: batch[k] for k in ("idx", "label", "status")}
        for name, model in self.models.items():
            feats = features_in_process(model, batch["image"][ok], device=self.device)
            full = np.zeros((len(ok), feats.shape[1] if len(feats) else model.embed_dim), np.float32)
            full[ok] = feats
            out[f"feat_{name}"] = full
        return out


def _pool_size(use_gpu: bool) -> int:
    """1..2 actors: a second only where the cluster keeps cores (or a GPU) free for it.

    Each actor imports torch and holds the model(s) (~1 GB), so on a small machine one is better.
    """
    import ray

    res = ray.cluster_resources()
    if use_gpu:
        return max(1, min(2, int(res.get("GPU", 1))))
    return 2 if res.get("CPU", 1) >= 4 else 1


def extract_features_multi(
    checkpoints: dict[str, str],
    items: Sequence[dict[str, Any]],
    image_size: int,
    batch_size: int = 128,
    which: str = "teacher",
    use_gpu: bool = False,
    max_actors: int | None = None,
) -> tuple[dict[str, np.ndarray], list, dict[str, int]]:
    """Features of several checkpoints in one pass over the images (decoded once, not per model).

    Returns ({name: float32 (N_kept, D)}, labels of the kept items in input order,
    {skip reason: count}).
    """
    import ray

    from pipeline.models.checkpoint import read_meta

    for path in checkpoints.values():
        read_meta(path)  # fail on the driver with a CheckpointError, not inside an actor
    if not items:
        raise ValueError("no images to extract features from")
    rows = [{"idx": i, "input": str(it["input"]), "label": str(it["label"])} for i, it in enumerate(items)]
    actors = max_actors or _pool_size(use_gpu)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"image_size": image_size}, batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(
        _Encoders,
        fn_constructor_kwargs={"checkpoints": dict(checkpoints), "which": which, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["idx"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    ok = cols["status"] == OK
    reasons, counts = np.unique(cols["status"][~ok], return_counts=True)
    skipped = {str(r): int(c) for r, c in zip(reasons, counts)}
    feats = {name: np.ascontiguousarray(cols[f"feat_{name}"][ok], dtype=np.float32) for name in checkpoints}
    return feats, [str(v) for v in cols["label"][ok]], skipped


def extract_features(
    checkpoint_dir: str,
    items: Sequence[dict[str, Any]],
    image_size: int,
    batch_size: int = 128,
    which: str = "teacher",
    use_gpu: bool = False,
    max_actors: int | None = None,
) -> tuple[np.ndarray, list, dict[str, int]]:
    """(features float32 (N_kept, D), labels, {skip reason: count}) of one checkpoint's encoder.

    `items` are dicts with `input` (image path) and `label`; unreadable images are skipped and
    counted by reason (see pipeline.data.schema), never raised.
    """
    feats, labels, skipped = extract_features_multi({"model": str(checkpoint_dir)}, items, image_size, batch_size, which, use_gpu, max_actors)
    return feats["model"], labels, skipped
