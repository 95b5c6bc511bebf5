"""What the model sees, in MLflow: the start-of-run preview (source images with crop boxes, crops,
annotation views and texts) is the crop stage's own first-pass output, drawn where the boxes say,
and the end-of-run learning curves come from the run's metric history; read back through the
MLflow client and decoded as PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Config, DataConfig, PathsConfig, TextViewsConfig, TrackingConfig, TrainConfig, ViewsConfig
from pipeline.tracking import RunLogger, start_run
from pipeline.train import preview

M, A, N = 3, 2, 6


def _expected_grid(rows: int, cols: int) -> tuple[int, int]:
    """Each tile CELL px square under a LABEL_H label, PAD px around every tile."""
    return cols * (preview.CELL + preview.PAD) + preview.PAD, rows * (
        preview.LABEL_H + preview.CELL + preview.PAD
    ) + preview.PAD


def _download(uri: str, run_id: str, path: str, dst) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri)


@pytest.mark.ray
def test_preview_is_the_crop_stage_first_pass_with_boxes_drawn_where_they_are(ray_cluster, digit_shards, tmp_path):
    from pipeline.data.crop_stage import build_crop_dataset
    from pipeline.data.shards import read_shards

    views = ViewsConfig(
        num_views=M,
        view_size=32,
        annotation_views=A,
        scale=(0.2, 0.9),
        batch_size=16,
        concurrency=1,
        cpus_per_actor=0.5,
    )
    cfg = Config(
        paths=PathsConfig(root=str(tmp_path)),
        data=DataConfig(shards=str(digit_shards)),
        views=views,
        train=TrainConfig(seed=5, run_name="preview"),
        tracking=TrackingConfig(preview_images=N),
    ).resolved()
    run_id = start_run(cfg.tracking.tracking_uri, "abpipe", "preview", {})
    logged = preview.log_preview(cfg, RunLogger(cfg.tracking.tracking_uri, run_id))

    client = MlflowClient(cfg.tracking.tracking_uri)
    names = {a.path for a in client.list_artifacts(run_id, "preview")}
    assert (
        names
        == {f"preview/{f}" for f in ("source_boxes.png", "crops.png", "annotations.png", "samples.json")}
        == set(logged)
    )
    local = _download(cfg.tracking.tracking_uri, run_id, "preview", tmp_path / "dl")
    sizes = {
        "source_boxes.png": _expected_grid(math.ceil(N / 4), 4),
        "crops.png": _expected_grid(N, M),
        "annotations.png": _expected_grid(N, A),
    }
    images = {}
    for name, size in sizes.items():
        with Image.open(f"{local}/{name}") as im:
            assert im.format == "PNG" and im.size == size, (name, im.size)
            images[name] = np.asarray(im.convert("RGB"))
    with open(f"{local}/samples.json") as fh:
        record = json.load(fh)
    assert len(record["keys"]) == N and record["seed"] == 5

    # The same images through the real crop stage on Ray (first pass): same boxes and same crops.
    ds = build_crop_dataset(read_shards(str(digit_shards)), views, seed=5, stats_name="preview-check", keep_meta=True)
    batch = {row["key"]: row for row in ds.take_all() if row["key"] in record["keys"]}
    assert set(batch) == set(record["keys"])
    for key, boxes in zip(record["keys"], record["boxes"]):
        np.testing.assert_array_equal(np.asarray(boxes, np.float32), batch[key]["boxes"])

    # Crops: row i of crops.png shows batch[key]["views"] scaled 4x (32 -> 128 px, nearest).
    for i, key in enumerate(record["keys"]):
        for j in range(M):
            x0 = preview.PAD + j * (preview.CELL + preview.PAD)
            y0 = preview.PAD + i * (preview.LABEL_H + preview.CELL + preview.PAD) + preview.LABEL_H
            tile = images["crops.png"][y0 : y0 + preview.CELL, x0 : x0 + preview.CELL]
            inner = tile[4:-4:4, 4:-4:4]  # one pixel per source pixel, away from the coloured frame
            np.testing.assert_array_equal(inner, batch[key]["views"][j][1:-1, 1:-1])

    # Boxes: every pixel drawn in box j's colour lies on the outline of box j as the batch gives it
    # (digits are 32 px grey images: 4x in a 128 px tile, no offset), and the last box is whole.
    drawn = images["source_boxes.png"]
    for i, key in enumerate(record["keys"]):
        tx = preview.PAD + (i % 4) * (preview.CELL + preview.PAD)
        ty = preview.PAD + (i // 4) * (preview.LABEL_H + preview.CELL + preview.PAD) + preview.LABEL_H
        tile = drawn[ty : ty + preview.CELL, tx : tx + preview.CELL]
        for j, box in enumerate(batch[key]["boxes"]):
            x0, y0, x1, y1 = (
                np.floor(box[:2] * 128).astype(int).tolist() + (np.ceil(box[2:] * 128) - 1).astype(int).tolist()
            )
            ys, xs = np.nonzero(np.all(tile == preview.box_colour(j), axis=-1))
            assert len(xs) > 0, f"{key}: box {j} not drawn"
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            on_edge = (xs <= x0 + 1) | (xs >= x1 - 1) | (ys <= y0 + 1) | (ys >= y1 - 1)
            assert np.all(inside & on_edge), f"{key}: box {j} drawn off its outline"
            if j == M - 1:
                assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)


def _png(seed: int) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_text_annotations_appear_as_their_strings():
    captions = [["a cat on a mat", "a grey cat"], ["a red bus"], ["two dogs"]]
    batch = {
        "__key__": np.array([f"k{i}" for i in range(3)], dtype=object),
        "jpg": np.array([_png(i) for i in range(3)], dtype=object),
        "json": np.array([json.dumps({"captions": c}) for c in captions], dtype=object),
        "txt": np.array([None] * 3, dtype=object),
    }
    views = ViewsConfig(
        num_views=0, view_size=32, annotation_views=1, text=TextViewsConfig(source="captions", context_length=16)
    )
    out = preview.cut_preview(batch, views, seed=3)
    from pipeline.data.tokens import build_tokenizer, tokenize

    assert [t in c for t, c in zip(out["texts"], captions)] == [True] * 3
    np.testing.assert_array_equal(tokenize(build_tokenizer("ViT-S-16", 16), list(out["texts"]), 16), out["tokens"])
    images = preview.preview_images(out)
    assert set(images) == {"annotations.png"}  # no crops to draw for CLIP's layout
    assert images["annotations.png"].size == _expected_grid(3, 1 + preview.TEXT_COLS)


def test_learning_curves_come_from_the_metric_history(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "abpipe", "curves", {})
    logger = RunLogger(uri, run_id)
    for step in range(1, 4):  # 3 points a curve draw the same panels as 10 (the layout counts metrics, not steps)
        logger.metrics(
            {
                "loss": 2.0 / step,
                "loss_annotation": 1.0 / step,
                "loss_propagation": 1.0 / step,
                "lr": 1e-3 * step,
                "views_per_s": 100.0,
                "rankme": 3.0,
                "views_seen": 40.0 * step,
            },
            step,
        )
    logger.metrics({"wall_time_s": 12.0, "final_step": 3}, 3)
    assert preview.log_learning_curves(uri, run_id, logger, "curves") == "learning_curves.png"

    client = MlflowClient(uri)
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(run_id)}
    local = _download(uri, run_id, "learning_curves.png", tmp_path / "dl")
    panels = 4  # loss + its 2 terms together, then lr, rankme, views_per_s (views_seen, wall_time_s, final_step: no)
    rows, cols = math.ceil(panels / 3), 3
    with Image.open(local) as im:
        assert im.format == "PNG" and im.size == (
            int(preview.PANEL_IN[0] * cols * preview.DPI),
            int(preview.PANEL_IN[1] * rows * preview.DPI),
        )


def test_a_preview_that_cannot_be_cut_never_stops_the_run(tmp_path, capsys):
    from pipeline.train.trainer import _log_preview

    cfg = Config(paths=PathsConfig(root=str(tmp_path)), data=DataConfig(shards=str(tmp_path / "no-shards"))).resolved()
    run_id = start_run(cfg.tracking.tracking_uri, "abpipe", "r", {})
    _log_preview(cfg, RunLogger(cfg.tracking.tracking_uri, run_id))
    assert "WARNING: no start-of-run preview images (FileNotFoundError: no _stats.json" in capsys.readouterr().out
    assert not MlflowClient(cfg.tracking.tracking_uri).list_artifacts(run_id)
