"""Box algebra (hypothesis), crop sampling vs torchvision, view cutting, and the Ray crop stage."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import ViewsConfig
from pipeline.data.crop_stage import MultiViewCropper, draft_size
from pipeline.data.schema import decode_rgb
from pipeline.data.views import (
    _crop_resize,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    cut_views,
    gaussian_blur,
    make_views,
    sample_boxes,
    simclr_augment,
)
from pipeline.geometry import (
    absolute_box,
    box_corners,
    box_iou,
    clip_box_px,
    compose,
    relative_box,
)

# The property tests check values, not speed: no per-example deadline (hypothesis' 200 ms default failed
# test_identity_action's first example on a host busy with a study, 2026-12-07).
settings.register_profile("values-not-speed", deadline=None)
settings.load_profile("values-not-speed")

# ---------------------------------------------------------------------------------------------
# Box algebra, checked against a direct statement of each quantity (not the module's own algebra)


@st.composite
def boxes(draw):
    """A valid xyxy box with width and height >= 0.05 inside [-1, 2]^2."""
    x0 = draw(st.floats(-1.0, 1.9))
    y0 = draw(st.floats(-1.0, 1.9))
    return np.array([x0, y0, x0 + draw(st.floats(0.05, 1.0)), y0 + draw(st.floats(0.05, 1.0))])


def direct_relative(s, t):
    """bb_{s->t} stated directly: where t's edges fall, as fractions of s's extent from s's corner."""
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
    np.testing.assert_allclose(
        compose(relative_box(a, b), relative_box(b, c)), relative_box(a, c), rtol=1e-9, atol=1e-9
    )


@settings(max_examples=30)
@given(
    st.lists(st.lists(boxes(), min_size=1, max_size=5), min_size=1, max_size=3).filter(
        lambda bs: len({len(x) for x in bs}) == 1
    )
)
def test_all_pairs_broadcast_equals_double_loop_numpy_and_torch(batch):
    arr = np.stack([np.stack(bs) for bs in batch])  # (B, M, 4)
    pairs = relative_box(arr[:, :, None, :], arr[:, None, :, :])  # (B, M, M, 4)
    assert pairs.shape == arr.shape[:2] + (arr.shape[1], 4)
    for b in range(arr.shape[0]):
        for s in range(arr.shape[1]):
            for t in range(arr.shape[1]):
                np.testing.assert_allclose(
                    pairs[b, s, t], direct_relative(arr[b, s], arr[b, t]), rtol=1e-12, atol=1e-12
                )
    tarr = torch.from_numpy(arr)
    t_pairs = relative_box(tarr[:, :, None, :], tarr[:, None, :, :])
    assert isinstance(t_pairs, torch.Tensor)
    np.testing.assert_allclose(t_pairs.numpy(), pairs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        absolute_box(tarr[:, :, None, :], t_pairs).numpy(), np.broadcast_to(arr[:, None], pairs.shape), atol=1e-9
    )


@given(boxes())
def test_box_corners_order(b):
    """Corners are top-left, top-right, bottom-left, bottom-right as (x, y), numpy and torch."""
    x0, y0, x1, y1 = b
    expected = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    np.testing.assert_array_equal(box_corners(b), expected)
    np.testing.assert_array_equal(box_corners(torch.from_numpy(b)).numpy(), expected)
    assert box_corners(np.stack([b, b])[None]).shape == (1, 2, 4, 2)


def test_iou_and_clipping():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0
    clipped, valid = clip_box_px([[-5, -5, 10, 10], [50, 50, 60, 60], [3, 3, 3, 9], [0, 0, np.nan, 4]], 20, 20)
    np.testing.assert_allclose(clipped[0], [0, 0, 10, 10])
    assert valid.tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------------------------
# sample_boxes: RandomResizedCrop.get_params' distribution


def _torchvision_boxes(height, width, n, scale, ratio, seed=0):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    img = torch.zeros(1, height, width)
    ijhw = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=np.float64)
    return np.stack([ijhw[:, 1], ijhw[:, 0], ijhw[:, 1] + ijhw[:, 3], ijhw[:, 0] + ijhw[:, 2]], axis=-1)


def _stats(b, height, width):
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return {
        "area": w * h / (height * width),
        "log_ratio": np.log(w / h),
        "cx": (b[:, 0] + b[:, 2]) / 2 / width,
        "cy": (b[:, 1] + b[:, 3]) / 2 / height,
    }


def test_sample_boxes_inside_and_within_scale_ratio():
    height, width, scale, ratio = 300, 400, (0.25, 1.0), (3 / 4, 4 / 3)
    b = sample_boxes(np.random.default_rng(0), height, width, 3000, scale, ratio)
    assert b.shape == (3000, 4) and b.dtype == np.float64
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= width).all() and (b[:, 3] <= height).all()
    assert (b == np.round(b)).all()  # integer pixel sides and offsets, as get_params
    fallback = (b == [0, 0, width, height]).all(axis=1)  # this image's ratio is in range: whole image
    s = _stats(b[~fallback], height, width)
    # Sides are rounded to whole pixels (>= 173 px here), so allow half a pixel per side.
    slack = 1 / 173
    assert s["area"].min() >= scale[0] * (1 - 2 * slack) and s["area"].max() <= 1.0
    assert np.exp(s["log_ratio"]).min() >= ratio[0] * (1 - 2 * slack)
    assert np.exp(s["log_ratio"]).max() <= ratio[1] * (1 + 2 * slack)


@pytest.mark.parametrize(
    "height,width,scale",
    [(240, 360, (0.08, 1.0)), (300, 300, (0.25, 1.0)), (40, 400, (0.08, 1.0))],  # last: mostly fallbacks
)
def test_sample_boxes_distribution_matches_torchvision(height, width, scale):
    n, ratio = 4000, (3 / 4, 4 / 3)
    ours = sample_boxes(np.random.default_rng(0), height, width, n, scale, ratio)
    ref = _torchvision_boxes(height, width, n, scale, ratio)
    o, r = _stats(ours, height, width), _stats(ref, height, width)
    for name in o:  # means within ~4 standard errors
        tol = 4 * max(r[name].std(), 1e-3) / np.sqrt(n)
        assert abs(o[name].mean() - r[name].mean()) < tol + 1e-3, name
    np.testing.assert_allclose(
        np.quantile(o["area"], [0.1, 0.5, 0.9]), np.quantile(r["area"], [0.1, 0.5, 0.9]), atol=0.03
    )
    fallback = _torchvision_boxes(height, width, 1, (1e6, 1e6), ratio)[0]  # no try can fit
    share_o, share_r = (ours == fallback).all(axis=1).mean(), (ref == fallback).all(axis=1).mean()
    assert abs(share_o - share_r) < 0.03  # same share of central fallback crops


def test_fallback_is_central_crop():
    """Scale too large to fit at any allowed ratio -> central crop at the clamped ratio, as torchvision."""
    b = sample_boxes(np.random.default_rng(0), 100, 400, 3, (1.0, 1.0), (3 / 4, 4 / 3))
    np.testing.assert_allclose(b, [[133, 0, 266, 100]] * 3)  # w = round(100 * 4/3) = 133
    np.testing.assert_allclose(b[0], _torchvision_boxes(100, 400, 1, (1.0, 1.0), (3 / 4, 4 / 3))[0])


# ---------------------------------------------------------------------------------------------
# Cutting views and the SimCLR augmentation


def _red_blue(height=64, width=128):
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = [255, 0, 0]
    img[:, width // 2 :] = [0, 0, 255]
    return img


@pytest.mark.parametrize("size", [16, 32, 100])
def test_cut_view_of_left_half_is_all_red(size):
    """No filter leakage across the box edge, down- or upsampling."""
    img = _red_blue()
    box = np.array([[0.0, 0.0, 0.5, 1.0]]) * [128, 64, 128, 64]
    views = cut_views(img, np.concatenate([box, box + [64, 0, 64, 0]]), size)
    assert views.shape == (2, size, size, 3) and views.dtype == np.uint8
    assert (views[0] == [255, 0, 0]).all() and (views[1] == [0, 0, 255]).all()


def test_cut_views_matches_torchvision_resized_crop(photo_files):
    import torchvision.transforms.v2.functional as TF

    img = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    chw = torch.from_numpy(img.copy()).permute(2, 0, 1)
    cases = [
        ((40, 30, 200, 150), 64),  # downscale 2.5x / 1.9x
        ((10, 20, 100, 80), 224),  # upscale
        ((0, 0, img.shape[1], img.shape[0]), 96),  # whole image, ~4x down
        ((5, 7, 305, 67), 60),  # 5x down in x, 1x in y
        ((30, 10, 70, 210), 100),  # mixed: 2.5x up in x, 2x down in y
    ]
    for (x0, y0, x1, y1), size in cases:
        ours = cut_views(img, np.array([[x0, y0, x1, y1]], dtype=np.float64), size)[0].astype(np.float32)
        ref = TF.resized_crop(chw, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True).permute(1, 2, 0).numpy()
        assert np.abs(ours - ref.astype(np.float32)).max() <= 1, ((x0, y0, x1, y1), size)  # same uint8 kernel


def test_resized_crop_is_packed_hwc(photo_files):
    """A resized crop comes out as a C-contiguous HWC array. torch's uint8 kernel returns planar
    (NCHW) memory unless its input is restrided (pytorch/pytorch#68430); every OpenCV op and the
    batch copy would then pay a strided copy costing ~2x the resize (benchmarks/bench_crop_stage.py)."""
    img = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    box = np.array([[40, 30, 200, 150]], dtype=np.float64)
    ref = torchvision_resized_crop(img, box[0], 64)
    region = img[30:150, 40:200]
    for view in (_crop_resize(img, box[0], 64), _crop_resize(region.copy(), np.array([0, 0, 160, 120]), 64)):
        assert view.shape == (64, 64, 3) and view.flags["C_CONTIGUOUS"], view.strides
        assert np.abs(view.astype(int) - ref).max() <= 1
    cfg = ViewsConfig(color_jitter=0.0, grayscale_p=0.0, blur_p=0.0)  # the bare crop (maybe flipped)
    assert simclr_augment(np.random.default_rng(0), img, 64, cfg).flags["C_CONTIGUOUS"]


def torchvision_resized_crop(img: np.ndarray, box_px, size: int) -> np.ndarray:
    import torchvision.transforms.v2.functional as TF

    x0, y0, x1, y1 = map(int, box_px)
    chw = torch.from_numpy(img.copy()).permute(2, 0, 1)
    return (
        TF.resized_crop(chw, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)
        .permute(1, 2, 0)
        .numpy()
        .astype(int)
    )


def test_cut_views_sub_pixel_box():
    """A float box is honoured: a horizontal ramp's view starts and ends at the box's x values."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (8, 1, 3))
    view = cut_views(ramp, np.array([[10.5, 0, 74.5, 8]]), 64)[0].astype(float)
    np.testing.assert_allclose(view[0, :, 0], np.arange(64) + 10.5, atol=1.0)


def test_colour_ops_match_torchvision():
    """The OpenCV/lookup-table ops behind colour jitter agree with torchvision's functional ones."""
    import torchvision.transforms.v2.functional as TF

    img = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    pairs = [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ]
    for factor in (0.3, 1.7):
        for ours, ref in pairs:
            diff = ours(img, factor).astype(int) - ref(chw, factor).permute(1, 2, 0).numpy()
            assert np.abs(diff).max() <= 1 and np.abs(diff).mean() < 1, (ours.__name__, factor)
    for shift in (-0.2, 0.1, 0.45):
        diff = adjust_hue(img, shift).astype(int) - TF.adjust_hue(chw, shift).permute(1, 2, 0).numpy()
        assert np.abs(diff).mean() < 1.5
    assert np.abs(adjust_contrast(img, 0.3).astype(int) - img).mean() > 20  # each op does change the image


def test_blur_matches_torchvision_gaussian_blur():
    """SimCLR's blur (torchvision GaussianBlur, reflect padding) vs ours, kernel wide enough for +-3 sigma."""
    import torchvision.transforms.v2.functional as TF

    img = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    for sigma in (0.3, 1.0, 2.0):
        k = 2 * math.ceil(3 * sigma) + 1
        diff = (
            gaussian_blur(img, sigma).astype(int)
            - TF.gaussian_blur(chw, [k, k], [sigma, sigma]).permute(1, 2, 0).numpy()
        )
        assert np.abs(diff).max() <= 1 and np.abs(diff).mean() < 0.5
    assert np.abs(gaussian_blur(img, 2.0).astype(int) - img).mean() > 20  # it does blur noise away


def test_simclr_augment_without_distortion_is_resized_or_flipped_image():
    img = np.asarray(Image.fromarray(_red_blue(64, 64)))
    cfg = ViewsConfig(annotation_scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, grayscale_p=0.0, blur_p=0.0)
    whole = cut_views(img, np.array([[0, 0, 64, 64]]), 32)[0]
    seen = set()
    for seed in range(12):
        view = simclr_augment(np.random.default_rng(seed), img, 32, cfg)
        assert view.shape == (32, 32, 3) and view.dtype == np.uint8
        flipped = bool((view == whole[:, ::-1]).all())
        assert flipped or (view == whole).all()
        seen.add(flipped)
    assert seen == {True, False}


def test_simclr_augment_distorts_colour(photo_files):
    img = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    cfg = ViewsConfig(grayscale_p=1.0, blur_p=0.0)
    view = simclr_augment(np.random.default_rng(0), img, 48, cfg)
    assert (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()


def test_make_views_shapes_box_content_and_reproducibility(photo_files):
    img = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    cfg = ViewsConfig(num_views=3, view_size=48, annotation_views=2)
    out = make_views(img, np.random.default_rng(1), cfg)
    assert out["views"].shape == (3, 48, 48, 3) and out["views"].dtype == np.uint8
    assert out["ann_views"].shape == (2, 48, 48, 3) and out["ann_views"].dtype == np.uint8
    assert out["boxes"].shape == (3, 4) and out["boxes"].dtype == np.float32
    assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    h, w = img.shape[:2]
    for view, box in zip(out["views"], out["boxes"]):  # each view is exactly its box's content
        box_px = box.astype(np.float64) * [w, h, w, h]  # float32 round trip: near-integer pixels
        np.testing.assert_allclose(box_px, np.round(box_px), atol=1e-3)
        redo = cut_views(img, box_px[None], 48)[0]
        assert np.abs(redo.astype(int) - view.astype(int)).max() <= 1
    again = make_views(img, np.random.default_rng(1), cfg)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    # Written into preallocated batch rows (the crop stage's way): the same views, in those arrays.
    rows = {k: np.zeros((2, *v.shape), v.dtype) for k, v in out.items()}
    into = make_views(img, np.random.default_rng(1), cfg, into={k: v[1] for k, v in rows.items()})
    assert all(
        np.array_equal(rows[k][1], out[k]) and np.shares_memory(into[k], rows[k]) and not rows[k][0].any() for k in out
    )
    # Ablation: same boxes (drawn first from the same stream), but the views are augmented.
    aug = make_views(
        img, np.random.default_rng(1), ViewsConfig(num_views=3, view_size=48, annotation_views=2, augment_views=True)
    )
    np.testing.assert_array_equal(aug["boxes"], out["boxes"])
    assert not np.array_equal(aug["views"], out["views"])


# ---------------------------------------------------------------------------------------------
# The crop stage


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _corrupt(jpeg: bytes) -> bytes:
    """A JPEG whose headers parse but whose scan header/data is garbage: decode fails (corrupt)."""
    b = bytearray(jpeg)
    i = b.find(b"\xff\xda")
    b[i + 2 : i + 200] = np.random.default_rng(0).integers(0, 256, 198, dtype=np.uint8).tobytes()
    return bytes(b)


def test_draft_decode_keeps_smallest_crop_at_view_size(photo_files):
    cfg = ViewsConfig(view_size=64, scale=(0.25, 1.0), annotation_scale=(0.25, 1.0))
    n = draft_size(cfg)
    big = np.asarray(Image.open(photo_files[0]).convert("RGB").resize((1600, 1200)))
    rgb = decode_rgb(_jpeg(big), draft_to=n)
    assert min(rgb.shape[:2]) >= n and rgb.shape[0] < 1200  # reduced, but not below the bound
    boxes = sample_boxes(np.random.default_rng(0), rgb.shape[0], rgb.shape[1], 2000, cfg.scale, cfg.ratio)
    assert np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min() >= cfg.view_size - 1


def test_cropper_direct_epochs_meta_and_key_columns(photo_files):
    cfg = ViewsConfig(num_views=2, view_size=32, annotation_views=1)
    jpgs = [p.read_bytes() for p in photo_files[:2]]
    batch = {
        "__key__": np.array(["a", "b"]),
        "jpg": np.array(jpgs, dtype=object),
        "json": np.array([json.dumps({"labels": [7]}), b"{}"], dtype=object),
    }
    first = MultiViewCropper(cfg, seed=3, stats_name=None, keep_meta=True)(batch)
    assert first["key"].tolist() == ["a", "b"] and first["labels"].tolist() == ["7", ""]
    renamed = {"key": batch["__key__"], "jpg": batch["jpg"], "json": batch["json"]}
    fresh = MultiViewCropper(cfg, seed=3, stats_name=None)
    same = fresh(renamed)
    assert set(same) == {"views", "boxes", "ann_views"}
    np.testing.assert_array_equal(same["boxes"], first["boxes"])  # reproducible: (seed, key, epoch 0)
    second_epoch = fresh(renamed)
    assert not np.array_equal(second_epoch["boxes"], first["boxes"])


def test_crop_stage_on_ray_skips_counts_and_varies_epochs(ray_cluster, photo_files):
    import ray.data

    from pipeline.data.crop_stage import build_crop_dataset, crop_stats

    jpeg = photo_files[0].read_bytes()
    rows = [
        {"key": f"{i:09d}", "jpg": p.read_bytes(), "json": json.dumps({"labels": [f"c{i}"]})}
        for i, p in enumerate(photo_files[:4])
    ]
    rows += [
        {"key": "bad-corrupt", "jpg": _corrupt(jpeg), "json": "{}"},
        {"key": "bad-truncated", "jpg": jpeg[: len(jpeg) // 2], "json": "{}"},
        {"key": "bad-empty", "jpg": b"", "json": "{}"},
    ]
    ds = ray.data.from_items(rows)
    cfg = ViewsConfig(num_views=3, view_size=32, annotation_views=2, batch_size=3, concurrency=1)
    out_ds = build_crop_dataset(ds, cfg, seed=0, stats_name="test-crop-stats", keep_meta=True)
    first = out_ds.take_all()
    assert sorted(r["key"] for r in first) == [f"{i:09d}" for i in range(4)]
    for row in first:
        assert row["views"].shape == (3, 32, 32, 3) and row["views"].dtype == np.uint8
        assert row["boxes"].shape == (3, 4) and row["boxes"].dtype == np.float32
        assert row["ann_views"].shape == (2, 32, 32, 3) and row["ann_views"].dtype == np.uint8
        assert row["labels"] == "c" + str(int(row["key"]))
    assert crop_stats("test-crop-stats") == {"ok": 4, "corrupt": 1, "truncated": 1, "empty": 1}

    second = {r["key"]: r["boxes"] for r in out_ds.take_all()}  # a new actor pool: epoch 1 all the same
    assert all(not np.array_equal(second[r["key"]], r["boxes"]) for r in first)
    assert crop_stats("test-crop-stats")["ok"] == 8
