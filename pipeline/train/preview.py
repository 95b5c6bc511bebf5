"""What the model sees, as images in the run's MLflow page (driver side, best-effort).

At the start of a fresh run: the first `tracking.preview_images` samples of the first shard go
through the crop stage's own `MultiViewCropper` in this process (no Ray), with the run's views
config and seed, so they are exactly what the crop actors emit for those images in the first pass
(crops are seeded by (seed, key, pass), whichever actor cuts them). Logged under `preview/`:

- `source_boxes.png`: each source image with its M crop boxes drawn (box i in `BOX_COLOURS[i]`),
- `crops.png`: one row per image, its M crops,
- `annotations.png`: one row per image, its annotation views (and DINO local views), with the
  annotation text beside them for text methods (CLIP, SLIP, AB_CLIP, SiLC),
- `samples.json`: keys, boxes (the image's [0, 1] frame), texts, for checking against a batch.

At the end: `learning_curves.png`, every logged training metric against the step, read back from
the run's metric history (loss and its terms together in the first panel).

Images are drawn with Pillow on a fixed grid (sizes from `grid_size`), so a test can check sizes
and box pixels exactly; the learning curves with matplotlib's Agg backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import Config, ViewsConfig

CELL = 128  # px per tile side
LABEL_H = 14  # px of text above each row of tiles
PAD = 4
COLUMNS = 4  # source images per row in source_boxes.png
TEXT_COLS = 2  # tiles' worth of width for an annotation string
BOX_WIDTH = 2
# Saturated colours that never occur in the greyscale frame around a tile; photos may contain them.
BOX_COLOURS = [
    (255, 0, 0),
    (0, 200, 0),
    (0, 90, 255),
    (255, 200, 0),
    (255, 0, 255),
    (0, 230, 230),
    (255, 120, 0),
    (150, 0, 255),
]
BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
# Metrics that are not curves (logged once) or are the x axis.
NOT_CURVES = {"final_step", "wall_time_s", "views_seen"}


def box_colour(i: int) -> tuple[int, int, int]:
    return BOX_COLOURS[i % len(BOX_COLOURS)]


# ------------------------------------------------------------------------------------------ samples


def first_samples(shard_dir: str, n: int) -> dict[str, np.ndarray]:
    """The first `n` samples of the shard set's first tar, as the crop stage's input batch.

    Read with webdataset's own tar iterators, whose key rule (path up to the first dot) is the one
    Ray Data's read_webdataset uses, so the keys (and so the crop seeds) are the training stream's.
    """
    import posixpath

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from pipeline.data.shards import load_stats
    from pipeline.storage import filesystem

    stats = load_stats(shard_dir)
    if not stats.get("shards"):
        raise ValueError(f"{shard_dir} holds no usable samples")
    fs, base = filesystem(str(shard_dir))
    path = posixpath.join(base, min(stats["shards"]))
    rows: list[dict[str, Any]] = []
    with fs.open_input_stream(path) as stream:
        for sample in group_by_keys(tar_file_expander([{"url": path, "stream": stream}])):
            rows.append(sample)
            if len(rows) >= n:
                break
    return {col: np.array([r.get(col) for r in rows], dtype=object) for col in ("__key__", "jpg", "json", "txt")}


def cut_preview(batch: dict[str, np.ndarray], views: ViewsConfig, seed: int) -> dict[str, Any]:
    """The crop stage's output for `batch`, first pass, cut in this process; plus the decoded sources."""
    from pipeline.data.crop_stage import MultiViewCropper, draft_size
    from pipeline.data.schema import BadImage, decode_rgb

    out = MultiViewCropper(views, seed=seed, stats_name=None, keep_meta=True)(batch)
    sources = {}
    for key, data in zip(batch["__key__"], batch["jpg"]):
        try:
            sources[str(key)] = decode_rgb(bytes(data), draft_to=draft_size(views))
        except BadImage:
            continue
    out["sources"] = [sources[str(k)] for k in out["key"]]  # a list: the images' sizes differ
    return out


# ------------------------------------------------------------------------------------------ drawing


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a grid of `rows` x `cols` CELL-px tiles, each row under a LABEL_H label."""
    return cols * (CELL + PAD) + PAD, rows * (LABEL_H + CELL + PAD) + PAD


def _tile_origin(row: int, col: int) -> tuple[int, int]:
    return PAD + col * (CELL + PAD), PAD + row * (LABEL_H + CELL + PAD) + LABEL_H


def _fit(image: np.ndarray) -> tuple[Image.Image, int, int]:
    """The image scaled to fit a CELL square (aspect kept), and its offset inside the tile."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    scale = CELL / max(pil.size)
    w, h = max(1, round(pil.width * scale)), max(1, round(pil.height * scale))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return pil.resize((w, h), resample), (CELL - w) // 2, (CELL - h) // 2


def box_rectangle(box: np.ndarray, size: tuple[int, int], origin: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle of a [0, 1]-frame xyxy box drawn over an image of `size` at `origin`."""
    w, h = size
    x0, y0 = origin[0] + math.floor(box[0] * w), origin[1] + math.floor(box[1] * h)
    x1, y1 = origin[0] + math.ceil(box[2] * w) - 1, origin[1] + math.ceil(box[3] * h) - 1
    return x0, y0, max(x0, x1), max(y0, y1)


def draw_source_boxes(
    sources: list[np.ndarray], boxes: np.ndarray, keys: list[str]
) -> tuple[Image.Image, list[list[tuple]]]:
    """Source images with their crop boxes (box i in box_colour(i), drawn in order); also every
    box's drawn rectangle, for checking."""
    rows = math.ceil(len(sources) / COLUMNS)
    canvas = Image.new("RGB", grid_size(rows, min(COLUMNS, len(sources))), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    drawn = []
    for i, (image, image_boxes, key) in enumerate(zip(sources, boxes, keys)):
        x, y = _tile_origin(i // COLUMNS, i % COLUMNS)
        fitted, dx, dy = _fit(image)
        canvas.paste(fitted, (x + dx, y + dy))
        draw.text((x, y - LABEL_H + 1), str(key)[-20:], fill=TEXT)
        rects = [box_rectangle(b, fitted.size, (x + dx, y + dy)) for b in image_boxes]
        for j, rect in enumerate(rects):
            draw.rectangle(rect, outline=box_colour(j), width=BOX_WIDTH)
        drawn.append(rects)
    return canvas, drawn


def draw_rows(
    rows: list[list[np.ndarray]], labels: list[str], texts: list[str] | None = None, frames: bool = False
) -> Image.Image:
    """One row per image: its views as CELL tiles (box-coloured frames when `frames`), then its
    annotation string in TEXT_COLS tiles' width when `texts` is given."""
    cols = max((len(r) for r in rows), default=0) + (TEXT_COLS if texts is not None else 0)
    canvas = Image.new("RGB", grid_size(len(rows), max(cols, 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (views, label) in enumerate(zip(rows, labels)):
        x, y = _tile_origin(r, 0)
        draw.text((x, y - LABEL_H + 1), label, fill=TEXT)
        for c, view in enumerate(views):
            tx, ty = _tile_origin(r, c)
            fitted, dx, dy = _fit(view)
            canvas.paste(fitted, (tx + dx, ty + dy))
            if frames:
                draw.rectangle((tx, ty, tx + CELL - 1, ty + CELL - 1), outline=box_colour(c), width=BOX_WIDTH)
        if texts is not None:
            tx, ty = _tile_origin(r, len(views))
            chars = max(8, (TEXT_COLS * (CELL + PAD) - PAD) // 6)
            draw.multiline_text(
                (tx, ty), "\n".join(textwrap.wrap(str(texts[r]), chars)[: CELL // 12]), fill=TEXT, spacing=2
            )
    return canvas


def preview_images(out: dict[str, np.ndarray]) -> dict[str, Image.Image]:
    """{artifact file name: image} for one cut preview batch (empty columns are left out)."""
    keys = [str(k) for k in out["key"]]
    images: dict[str, Image.Image] = {}
    if out["views"].shape[1] > 0:
        images["source_boxes.png"] = draw_source_boxes(list(out["sources"]), out["boxes"], keys)[0]
        images["crops.png"] = draw_rows([list(v) for v in out["views"]], keys, frames=True)
    ann = [
        list(a) + list(out["local_views"][i] if "local_views" in out else []) for i, a in enumerate(out["ann_views"])
    ]
    if any(ann):
        texts = [str(t) for t in out["texts"]] if "texts" in out else None
        images["annotations.png"] = draw_rows(ann, keys, texts)
    return images


# ------------------------------------------------------------------------------------------ logging


def preview_streams(cfg: Config) -> dict[str, tuple[str, ViewsConfig, int]]:
    """{stream: (first shard set, views config, seed)} as the trainer's crop stages are built."""
    from pipeline.train.trainer import stream_views

    return {
        name: (next(iter(mixture), shards), views, seed)
        for name, (shards, mixture, views, seed) in stream_views(cfg).items()
    }


def log_preview(cfg: Config, logger, prefix: str = "preview") -> list[str]:
    """Cut and log the start-of-run preview of every stream (see module doc); returns artifact paths."""
    logged = []
    with tempfile.TemporaryDirectory(prefix="abpipe-preview-") as tmp:
        for stream, (shards, views, seed) in preview_streams(cfg).items():
            batch = first_samples(shards, cfg.tracking.preview_images)
            out = cut_preview(batch, dataclasses.replace(views, concurrency=None), seed)
            folder = prefix if stream == "train" else f"{prefix}/{stream}"
            local = os.path.join(tmp, stream)
            os.makedirs(local)
            for name, image in preview_images(out).items():
                image.save(os.path.join(local, name))
            record = {
                "shards": shards,
                "seed": seed,
                "pass": 0,
                "keys": [str(k) for k in out["key"]],
                "boxes": np.asarray(out["boxes"]).tolist(),
                "texts": [str(t) for t in out.get("texts", [])],
            }
            with open(os.path.join(local, "samples.json"), "w") as fh:
                json.dump(record, fh, indent=1)
            for name in sorted(os.listdir(local)):
                logger.artifact(os.path.join(local, name), folder)
                logged.append(f"{folder}/{name}")
    return logged


def curve_layout(n: int) -> tuple[int, int]:
    """(rows, cols) of the learning-curve panels."""
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


PANEL_IN = (4.0, 2.6)  # inches per panel
DPI = 100


def learning_curves(history: dict[str, list[tuple[int, float]]], path: str, title: str = "") -> str:
    """Every metric's (step, value) curve in its own panel; loss and loss_* share the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted(k for k in history if k == "loss" or k.startswith("loss_"))
    others = sorted(k for k in history if k not in losses and k not in NOT_CURVES)
    panels = ([losses] if losses else []) + [[k] for k in others]
    rows, cols = curve_layout(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows), dpi=DPI, squeeze=False)
    for ax, keys in zip(axes.flat, panels):
        for key in keys:
            points = sorted(history[key])
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, linewidth=1.2)
        ax.set_title(", ".join(keys) if len(keys) < 4 else "loss terms", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox cropping: the size stays figsize x dpi
    plt.close(fig)
    return path


def log_learning_curves(tracking_uri: str, run_id: str, logger, title: str = "") -> str | None:
    """Read the run's metric histories back from MLflow and log `learning_curves.png`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k not in NOT_CURVES]
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}
    history = {k: v for k, v in history.items() if v}
    if not history:
        return None
    with tempfile.TemporaryDirectory(prefix="abpipe-curves-") as tmp:
        path = learning_curves(history, os.path.join(tmp, "learning_curves.png"), title)
        logger.artifact(path)
    return "learning_curves.png"
