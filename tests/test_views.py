"""Box algebra (hypothesis), crop sampling vs torchvision, view cutting, and the Ray crop stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import ViewsConfig
from pipeline.data.boxes import absolute_box, box_corners, box_iou, clip_box_px, compose, relative_box
from pipeline.data.views import cut_views, make_views, sample_boxes

unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def boxes(draw):
    """A valid xyxy box with width and height >= 0.05 inside [-1, 2]^2."""
    x0 = draw(st.floats(-1.0, 1.9))
    y0 = draw(st.floats(-1.0, 1.9))
    return np.array([x0, y0, x0 + draw(st.floats(0.05, 1.0)), y0 + draw(st.floats(0.05, 1.0))])


def direct_relative(s, t):
    """Independent statement of bb_{s->t}: where do t's edges fall, as fractions of s's extent?"""
    sx, sy, sw, sh = s[0], s[1], s[2] - s[0], s[3] - s[1]
    return np.array([(t[0] - sx) / sw, (t[1] - sy) / sh, (t[2] - sx) / sw, (t[3] - sy) / sh])


@given(boxes())
def test_identity_action(b):
    np.testing.assert_allclose(relative_box(b, b), [0, 0, 1, 1], atol=1e-12)


@given(boxes(), boxes())
def test_relative_matches_direct_and_round_trips(s, t):
    np.testing.assert_allclose(relative_box(s, t), direct_relative(s, t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(absolute_box(s, relative_box(s, t)), t, atol=1e-9)


@given(boxes(), boxes(), boxes())
def test_composition(a, b, c):
    np.testing.assert_allclose(compose(relative_box(a, b), relative_box(b, c)), relative_box(a, c), atol=1e-8)


@settings(max_examples=25)
@given(st.lists(boxes(), min_size=2, max_size=5))
def test_all_pairs_broadcast_numpy_and_torch(bs):
    arr = np.stack(bs)[None]  # (1, M, 4)
    pairs = relative_box(arr[:, :, None, :], arr[:, None, :, :])
    t_pairs = relative_box(torch.from_numpy(arr)[:, :, None, :], torch.from_numpy(arr)[:, None, :, :]).numpy()
    for s in range(len(bs)):
        for t in range(len(bs)):
            np.testing.assert_allclose(pairs[0, s, t], direct_relative(bs[s], bs[t]), atol=1e-12)
    np.testing.assert_allclose(t_pairs, pairs, atol=1e-12)


def test_box_corners_order():
    corners = box_corners(np.array([0.1, 0.2, 0.7, 0.9]))
    np.testing.assert_allclose(corners, [[0.1, 0.2], [0.7, 0.2], [0.1, 0.9], [0.7, 0.9]])
    assert torch.equal(box_corners(torch.tensor([0.1, 0.2, 0.7, 0.9])), torch.tensor(corners, dtype=torch.float32))


def test_iou_and_clipping():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0
    clipped, valid = clip_box_px([[-5, -5, 10, 10], [50, 50, 60, 60], [3, 3, 3, 9], [0, 0, np.nan, 4]], 20, 20)
    np.testing.assert_allclose(clipped[0], [0, 0, 10, 10])
    assert valid.tolist() == [True, False, False, False]


def test_sample_boxes_inside_and_within_scale_ratio():
    rng = np.random.default_rng(0)
    b = sample_boxes(rng, 300, 400, 2000, (0.25, 1.0), (3 / 4, 4 / 3))
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 400).all() and (b[:, 3] <= 300).all()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area = w * h / (300 * 400)
    assert area.min() > 0.24 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4


def test_sample_boxes_distribution_matches_torchvision():
    """Mean and quartiles of area fraction and centre position agree with RandomResizedCrop.get_params."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, 240, 360)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])  # i, j, h, w
    ours = sample_boxes(np.random.default_rng(0), 240, 360, 4000, (0.08, 1.0), (3 / 4, 4 / 3))
    ref_area = ref[:, 2] * ref[:, 3] / (240 * 360)
    our_area = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1]) / (240 * 360)
    np.testing.assert_allclose(np.quantile(our_area, [0.25, 0.5, 0.75]), np.quantile(ref_area, [0.25, 0.5, 0.75]), atol=0.03)
    ref_cx = (ref[:, 1] + ref[:, 3] / 2) / 360
    our_cx = (ours[:, 0] + ours[:, 2]) / 2 / 360
    assert abs(ref_cx.mean() - our_cx.mean()) < 0.02


def test_fallback_is_central_crop():
    """Scale too large to fit at any allowed ratio -> central crop at the clamped ratio, as torchvision."""
    b = sample_boxes(np.random.default_rng(0), 100, 400, 3, (1.0, 1.0), (3 / 4, 4 / 3))
    np.testing.assert_allclose(b, [[133, 0, 267, 100]] * 3)


def test_cut_views_exact_regions():
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :64] = [255, 0, 0]
    img[:, 64:] = [0, 0, 255]
    views = cut_views(Image.fromarray(img), np.array([[0, 0, 64, 64], [64, 0, 128, 64]]), 16)
    assert views.shape == (2, 16, 16, 3) and views.dtype == np.uint8
    assert (views[0] == [255, 0, 0]).all() and (views[1] == [0, 0, 255]).all()


def test_cut_views_matches_torchvision_resized_crop(photo_files):
    import torchvision.transforms.v2.functional as TF

    img = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    box = np.array([[40, 30, 200, 150]])
    ours = cut_views(Image.fromarray(img), box, 64)[0].astype(np.float32)
    ref = TF.resized_crop(torch.from_numpy(img).permute(2, 0, 1), 30, 40, 120, 160, [64, 64], antialias=True)
    assert np.abs(ours - ref.permute(1, 2, 0).numpy().astype(np.float32)).mean() < 3.0


def test_make_views_shapes_and_box_content(photo_files):
    img = Image.open(photo_files[0]).convert("RGB")
    cfg = ViewsConfig(num_views=3, view_size=48, annotation_views=2)
    out = make_views(img, np.random.default_rng(1), cfg)
    assert out["views"].shape == (3, 48, 48, 3) and out["ann_views"].shape == (2, 48, 48, 3)
    assert out["boxes"].dtype == np.float32 and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    w, h = img.size
    for view, box in zip(out["views"], out["boxes"]):  # each view is exactly its box's content
        redo = cut_views(img, box[None].astype(np.float64) * [w, h, w, h], 48)[0]
        assert np.abs(redo.astype(int) - view.astype(int)).max() <= 1


def _shard_rows(photo_files, bad: dict[str, bytes]):
    rows = []
    for i, p in enumerate(photo_files[:4]):
        rows.append({"__key__": f"{i:09d}", "jpg": p.read_bytes(), "json": json.dumps({"labels": ["x"]}).encode()})
    for j, (name, data) in enumerate(bad.items()):
        rows.append({"__key__": f"bad{j}", "jpg": data, "json": b"{}"})
    return rows


def test_crop_stage_on_ray_skips_and_counts(ray_cluster, photo_files):
    import ray.data

    from pipeline.data.crop_stage import build_crop_dataset, crop_stats

    jpeg = photo_files[0].read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="PNG")
    bad = {"empty": b"", "truncated": jpeg[: len(jpeg) // 2], "not_image": b"not an image at all"}
    ds = ray.data.from_items(_shard_rows(photo_files, bad))
    cfg = ViewsConfig(num_views=3, view_size=32, annotation_views=2, batch_size=3, concurrency=1)
    out = build_crop_dataset(ds, cfg, seed=0, stats_name="test-crop-stats").take_all()
    assert len(out) == 4
    for row in out:
        assert row["views"].shape == (3, 32, 32, 3) and row["views"].dtype == np.uint8
        assert row["boxes"].shape == (3, 4) and row["ann_views"].shape == (2, 32, 32, 3)
    assert crop_stats("test-crop-stats") == {"ok": 4, "empty": 1, "truncated": 1, "not_image": 1}
