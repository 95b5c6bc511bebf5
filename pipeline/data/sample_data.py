"""Small real datasets built from images that installed packages ship (no downloads).

- `write_digits_folder`: scikit-learn's handwritten digits (1,797 real scans, 10 classes), upscaled
  and written as PNG/JPEG files in class sub-folders: a labelled set for probes and the demo.
- `write_photo_files`: scikit-image's sample photographs (astronaut, coffee, chelsea, rocket, ...)
  as JPEGs: real camera images with real JPEG statistics for the crop stage and benchmarks.
- `write_photo_shards`: `n` of those (re-cropped copies) ingested by abpipe into WebDataset shards:
  the benchmarks' training stream.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "hubble_deep_field",
    "motorcycle_left",
    "immunohistochemistry",
    "colorwheel",
    "cat",
)


def write_digits_folder(
    out_dir: str | os.PathLike,
    size: int = 32,
    per_class: int | None = None,
    fmt: str = "png",
) -> Path:
    """Write sklearn's digits as RGB images in `out_dir/<digit>/<index>.<fmt>`; returns out_dir.

    Digits are white on black, as scanned: no per-image colour, which contrastive learning would
    use as a shortcut to tell instances apart instead of reading the shape.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir)
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        grey = (image / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "jpg":
            pil.save(folder / f"{index:05d}.jpg", quality=95)
        else:
            pil.save(folder / f"{index:05d}.{fmt}")
    return out


def photo_arrays() -> dict[str, np.ndarray]:
    """The RGB photos scikit-image ships in its wheel (skips any a given version lacks)."""
    from skimage import data

    photos = {}
    for name in PHOTO_NAMES:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            arr = np.asarray(loader())
        except Exception:  # a loader that would need a download: not shipped, skip it
            continue
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] < 3:
            continue
        photos[name] = arr[..., :3].astype(np.uint8)
    if not photos:
        raise RuntimeError("scikit-image ships no usable sample photos in this version")
    return photos


def write_photo_files(
    out_dir: str | os.PathLike, copies: int = 1, max_side: int | None = None, quality: int = 90
) -> list[Path]:
    """Write the shipped photos as JPEGs (optionally `copies` random re-crops of each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, arr in photo_arrays().items():
        for c in range(copies):
            img = arr
            if c:
                h, w = arr.shape[:2]
                ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                img = arr[y : y + ch, x : x + cw]
            pil = Image.fromarray(np.ascontiguousarray(img))
            if max_side and max(pil.size) > max_side:
                pil.thumbnail((max_side, max_side), Image.BICUBIC)
            path = out / f"{name}_{c:03d}.jpg"
            pil.save(path, quality=quality)
            paths.append(path)
    return paths


def write_photo_shards(out_dir: str | os.PathLike, n: int, samples_per_shard: int, max_side: int = 384) -> dict:
    """`n` photos (re-cropped copies) ingested by `write_shards` into `out_dir`/shards; its stats.

    Needs Ray initialised (the ingest runs as Ray tasks).
    """
    from pipeline.config import IngestConfig
    from pipeline.data.shards import write_shards
    from pipeline.data.sources.image_folder import list_image_files

    out = Path(out_dir)
    photos = sorted(write_photo_files(out / "photos", copies=-(-n // len(photo_arrays())), max_side=max_side))[:n]
    items = list_image_files([str(p) for p in photos])
    return write_shards(
        items, str(out / "shards"), "files", IngestConfig(max_side=max_side, samples_per_shard=samples_per_shard)
    )
