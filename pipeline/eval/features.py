"""Frozen encoder features for a list of image files, with Ray Data.

Two stages: CPU tasks read + decode + resize (bad files become rows with a skip reason, so nothing
crashes and nothing is lost uncounted), then a small actor pool that loads each model once and runs
the encoder under `torch.inference_mode()`. Every row carries its item index, so Ray Data may
reorder rows freely; the driver sorts by index at the end.

On CPU, Ray Data fuses the decode stage into the actors (same resources): decoding is cheap next
to a ViT forward there. With `use_gpu` the actors ask for a GPU, so decoding stays a separate stage
of CPU tasks that feeds them.

Two resize modes:
- `crop` (classification): shorter side to `image_size`, then a centre crop (`PIL.ImageOps.fit`),
  the standard eval transform: aspect ratio kept, the whole square the model sees is image.
- `stretch` (box tasks): the whole image squashed to S x S, nothing cropped, so boxes given in the
  full image's [0, 1] frame stay valid without any rewriting.

Per model the actors return the pooled output (linear / kNN probes) and, when asked, the final ViT
tokens `model.encode(x)` (decoder / attentive probes), stored as float16 to halve their size.

Checkpoint paths are opened by the actors: on a multi-node cluster they must be on storage every
node can read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline import console
from pipeline.data.schema import MISSING, OK, BadImage, decode_rgb

RESIZE_MODES = ("crop", "stretch")


def read_rgb(path: str, draft_to: int | None = None) -> np.ndarray:
    """The file's RGB uint8 (H, W, 3) (with `draft_to`, JPEG-decoded at reduced size when that still covers
    it). Raises BadImage (a missing file: `missing`)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImage(MISSING, str(exc)) from None
    return decode_rgb(data, draft_to=draft_to)


def load_and_resize(path: str, image_size: int, resize: str = "crop") -> np.ndarray:
    """RGB uint8 (S, S, 3) in `resize` mode (see module doc). Raises BadImage."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    image = Image.fromarray(read_rgb(path, draft_to=image_size))
    if resize == "stretch":
        return np.asarray(image.resize((image_size, image_size), Image.BICUBIC))
    return np.asarray(ImageOps.fit(image, (image_size, image_size), Image.BICUBIC))


def _decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    images = np.zeros((len(batch["input"]), image_size, image_size, 3), np.uint8)
    status = []
    for i, (path, resize) in enumerate(zip(batch["input"], batch["resize"])):
        try:
            images[i] = load_and_resize(str(path), image_size, str(resize))
            status.append(OK)
        except BadImage as exc:
            status.append(exc.reason)
    return {"idx": batch["idx"], "status": np.array(status), "image": images}


def features_in_process(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu", tokens: bool = False):
    """uint8 (N, H, W, 3) -> float32 (N, D) pooled features, in this process (no Ray).

    With `tokens`, returns (pooled, tokens float16 (N, T, D)); the pooled output is computed from
    the same forward pass (`forward_head` on the tokens), so nothing runs twice.
    """
    import torch

    from pipeline.models.ab_model import images_to_float
    from pipeline.models.encoder import pool_tokens

    pooled, toks = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images_to_float(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device))
            if tokens:
                t = model.encode(x)
                toks.append(t.half().cpu().numpy())
                pooled.append(pool_tokens(model.encoder, t).float().cpu().numpy())
            else:
                pooled.append(model.encoder_features(x).float().cpu().numpy())
    out = (
        np.concatenate(pooled).astype(np.float32, copy=False) if pooled else np.zeros((0, model.embed_dim), np.float32)
    )
    if not tokens:
        return out
    if not toks:  # no rows: run one dummy image for the token count
        n_tokens = int(getattr(model.encoder.patch_embed, "num_patches", 0)) + int(
            getattr(model.encoder, "num_prefix_tokens", 0)
        )
        return out, np.zeros((0, n_tokens, model.embed_dim), np.float16)
    return out, np.concatenate(toks)


class _Encoders:
    """Ray Data actor: loads every checkpoint once, then turns image batches into features."""

    def __init__(self, checkpoints: dict[str, str], which: str, use_gpu: bool, tokens: bool):
        import torch

        from pipeline.models.encoder import load_frozen_model

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokens = tokens
        self.models = {
            name: load_frozen_model(path, which=which, device=self.device)[0] for name, path in checkpoints.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == OK
        out = {k: batch[k] for k in ("idx", "status")}
        for name, model in self.models.items():
            result = features_in_process(model, batch["image"][ok], device=self.device, tokens=self.tokens)
            pooled, toks = result if self.tokens else (result, None)
            full = np.zeros((len(ok), model.embed_dim), np.float32)
            full[ok] = pooled
            out[f"pooled_{name}"] = full
            if toks is not None:
                full_t = np.zeros((len(ok), *toks.shape[1:]), np.float16)
                full_t[ok] = toks
                out[f"tokens_{name}"] = full_t
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


@dataclass
class Extracted:
    """Features of the images that decoded; row i of every array is `inputs[kept[i]]`."""

    pooled: dict[str, np.ndarray]  # model name -> float32 (N_kept, D)
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> float16 (N_kept, T, D), when asked
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # indices into the inputs
    dropped: dict[int, str] = field(default_factory=dict)  # index into the inputs -> skip reason

    def skipped_between(self, start: int = 0, stop: int | None = None) -> dict[str, int]:
        """Skip reason -> count over inputs[start:stop] (e.g. one split of a concatenated list)."""
        reasons = [r for i, r in self.dropped.items() if i >= start and (stop is None or i < stop)]
        return {r: reasons.count(r) for r in sorted(set(reasons))}

    @property
    def skipped(self) -> dict[str, int]:
        return self.skipped_between()


def extract_features_multi(
    checkpoints: dict[str, str],
    inputs: Sequence[str],
    image_size: int,
    batch_size: int = 128,
    which: str = "teacher",
    use_gpu: bool = False,
    max_actors: int | None = None,
    tokens: bool = False,
    resize: str | Sequence[str] = "crop",
) -> Extracted:
    """Features of several checkpoints in one pass over the images (decoded once, not per model).

    `resize` is one mode for all inputs or one per input, so the images of several tasks (boxes:
    stretch; classes: crop) go through one pass, loading each model once.
    """
    import ray

    from pipeline.checkpoints import read_meta

    for path in checkpoints.values():
        read_meta(path)  # fail on the driver with a CheckpointError, not inside an actor
    if not inputs:
        raise ValueError("no images to extract features from")
    modes = [resize] * len(inputs) if isinstance(resize, str) else list(resize)
    if len(modes) != len(inputs) or set(modes) - set(RESIZE_MODES):
        raise ValueError(
            f"resize: one of {RESIZE_MODES}, or one per input ({len(inputs)}), got {sorted(set(modes))} x {len(modes)}"
        )
    rows = [{"idx": i, "input": str(path), "resize": mode} for i, (path, mode) in enumerate(zip(inputs, modes))]
    actors = max_actors or _pool_size(use_gpu)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(
        _decode_batch, fn_kwargs={"image_size": image_size}, batch_size=batch_size, batch_format="numpy"
    )
    ds = ds.map_batches(
        _Encoders,
        fn_constructor_kwargs={"checkpoints": dict(checkpoints), "which": which, "use_gpu": use_gpu, "tokens": tokens},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )
    parts: dict[str, list[np.ndarray]] = {}
    with console.progress("eval features", total=len(rows), unit="img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
            bar.update(len(batch["idx"]))
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["idx"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    ok = cols["status"] == OK
    return Extracted(
        pooled={name: np.ascontiguousarray(cols[f"pooled_{name}"][ok], dtype=np.float32) for name in checkpoints},
        tokens={name: np.ascontiguousarray(cols[f"tokens_{name}"][ok]) for name in checkpoints} if tokens else {},
        kept=cols["idx"][ok].astype(np.int64),
        dropped={int(i): str(r) for i, r in zip(cols["idx"][~ok], cols["status"][~ok])},
    )


def extract_features(
    checkpoint_dir: str,
    inputs: Sequence[str],
    image_size: int,
    batch_size: int = 128,
    which: str = "teacher",
    use_gpu: bool = False,
    max_actors: int | None = None,
    tokens: bool = False,
    resize: str | Sequence[str] = "crop",
) -> Extracted:
    """`extract_features_multi` for one checkpoint; its features are under the name `model`."""
    return extract_features_multi(
        {"model": str(checkpoint_dir)}, inputs, image_size, batch_size, which, use_gpu, max_actors, tokens, resize
    )
