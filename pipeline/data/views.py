"""Multi-view sampling for one decoded image: AB's M crops with their boxes, and SimCLR views.

The image is decoded once by the caller; every view is cut from that one array, so decode cost
is paid once per image however many views it yields. Boxes follow torchvision's
RandomResizedCrop.get_params distribution exactly (area fraction uniform in `scale`, log-uniform
aspect ratio in `ratio`, integer sides by round(), 10 tries, then the central fallback crop), drawn
from a numpy Generator so CPU workers carry no global torch RNG state and every image has its own
reproducible stream. Everything runs on uint8 arrays: crops are resized by torch's uint8
antialiased kernel (torchvision's own resize), the SimCLR colour distortion by OpenCV (lookup
tables, saturating blends): several times cheaper per view than Pillow's resize and enhancers or
float tensor ops on a CPU worker, and checked against torchvision's functional ops in
tests/test_views.py.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ViewsConfig
from pipeline.data.pair_sampling import select_boxes

TRIES = 10  # get_params' number of attempts before the fallback

# A crop actor is given one CPU (views.cpus_per_actor): OpenCV's own thread pool would oversubscribe
# it (torch's is set to one thread by the crop actor itself: this module is imported by trainers too).
cv2.setNumThreads(1)


def sample_boxes(rng: np.random.Generator, height: int, width: int, num: int, scale, ratio) -> np.ndarray:
    """`num` independent RandomResizedCrop boxes, (num, 4) float64 pixel xyxy (integer-valued).

    All tries of all boxes are drawn at once; each box takes its first accepted try. Draws a box
    would not have used in get_params are simply ignored, so the distribution is the same.
    """
    area = float(height * width)
    target = area * rng.uniform(scale[0], scale[1], size=(num, TRIES))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(num, TRIES)))
    w = np.round(np.sqrt(target * aspect))  # np.round is round-half-even, as Python's round()
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)
    found = ok.any(axis=1)
    rows = np.arange(num)
    w, h = w[rows, first], h[rows, first]

    # Fallback (no try fitted): the whole image, or its central crop at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    # Positions only for the found boxes (as get_params: randint(0, side - crop + 1)).
    x0 = np.full(num, float((width - fw) // 2))
    y0 = np.full(num, float((height - fh) // 2))
    if found.any():
        y0[found] = rng.integers(0, height - h[found] + 1)
        x0[found] = rng.integers(0, width - w[found] + 1)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=-1).astype(np.float64)


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image


def _crop_resize(image: np.ndarray, box, size: int) -> np.ndarray:
    """Crop+resize one xyxy pixel box to (size, size) with antialiased bilinear, as RandomResizedCrop.

    A whole-pixel box (every sampled box) goes through torch's uint8 antialiased bilinear kernel,
    which is the kernel torchvision's resize calls (the view equals RandomResizedCrop's to within 1
    grey level, tested) and ~2.8x cheaper than Pillow's. A fractional box (e.g. a float32-normalised
    box mapped back) goes through Pillow's `resize(box=...)`, so a view is sub-pixel exactly its box:
    the box is first cut to its enclosing integer pixels, so the filter reads nothing outside it
    (Pillow clips its support to the image, not the box).
    """
    # Snap float noise (e.g. a float32-normalised box mapped back to pixels) to the whole pixel it
    # means: otherwise 39.99999 would pull pixel 39 into the filter's support.
    x0, y0, x1, y1 = (round(v) if abs(v - round(v)) < 1e-4 else v for v in map(float, box))
    height, width = image.shape[:2]
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    region = image[iy0:iy1, ix0:ix1]
    if (x0, y0, x1, y1) == (ix0, iy0, ix1, iy1):
        if region.shape[:2] == (size, size):
            return region.copy()
        return _resize_hwc(np.require(region, requirements=["C", "W"]), size)
    crop = Image.fromarray(np.ascontiguousarray(region))
    return np.asarray(crop.resize((size, size), Image.BILINEAR, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)))


def _resize_hwc(region: np.ndarray, size: int) -> np.ndarray:
    """Contiguous HWC uint8 -> (size, size, 3) contiguous HWC uint8, by torch's uint8 antialiased kernel.

    The HWC array is viewed as a channels-last 1x3xHxW tensor, the layout the fast uint8 kernel
    works in, with the batch stride set to numel: with any other batch stride torch allocates the
    output NCHW-contiguous (pytorch/pytorch#68430), so the kernel re-packs its result to planar and
    every later HWC consumer pays a strided copy back (300 px -> 224 px, ready to use: 287 vs 94 us
    packed, bench_crop_stage's breakdown). This is
    the same restride torchvision's v2 resize does, without importing torchvision into a crop
    actor (+1 s at every actor start).
    """
    h, w, c = region.shape
    nchw = torch.from_numpy(region).as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _crops(image: np.ndarray, boxes_px: np.ndarray, size: int) -> list[np.ndarray]:
    return [_crop_resize(image, b, size) for b in np.asarray(boxes_px, dtype=np.float64)]


def _stack(views: list[np.ndarray], size: int, into: np.ndarray | None = None) -> np.ndarray:
    """Stack views, into a caller's preallocated slot when given (one copy fewer per view)."""
    if not views:
        return np.zeros((0, size, size, 3), dtype=np.uint8) if into is None else into
    return np.stack(views, out=into)


def cut_views(image: np.ndarray | Image.Image, boxes_px: np.ndarray, size: int) -> np.ndarray:
    """(num, size, size, 3) uint8 views of the given pixel xyxy boxes of an HWC uint8 image."""
    return _stack(_crops(_rgb(image), boxes_px, size), size)


def _lut(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.float64)


def adjust_brightness(view: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (torchvision's adjust_brightness): one 256-entry lookup table."""
    return cv2.LUT(view, _lut(_LEVELS * factor))


_GREY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def _grey(view: np.ndarray) -> np.ndarray:
    """torchvision's rgb_to_grayscale on uint8: its weights, truncated (OpenCV's rounds)."""
    return (view.astype(np.float32) @ _GREY_WEIGHTS).astype(np.uint8)


def adjust_contrast(view: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level (torchvision's adjust_contrast): a lookup table."""
    mean = float(_grey(view).mean())
    return cv2.LUT(view, _lut(_LEVELS * factor + (1 - factor) * mean))


def adjust_saturation(view: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the greyscale image (torchvision's adjust_saturation), saturating to [0, 255]."""
    grey = cv2.cvtColor(_grey(view), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(view, factor, grey, 1 - factor, 0.0)


_HUE_STEPS = 256  # OpenCV's 8-bit "FULL" HSV stores hue as h * 256 (one turn = 256 steps)


def adjust_hue(view: np.ndarray, shift: float) -> np.ndarray:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]) through OpenCV's 8-bit full-range HSV."""
    hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV_FULL)
    d = round(shift * _HUE_STEPS)
    lut = ((np.arange(256) + d) % _HUE_STEPS).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def gaussian_blur(view: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` px, kernel +-3 sigma, reflected borders
    (torchvision's GaussianBlur pads the same way)."""
    return cv2.GaussianBlur(view, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def colour_jitter(rng: np.random.Generator, view: np.ndarray, strength: float) -> np.ndarray:
    """SimCLR's RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8), ops in random order."""
    if strength <= 0 or rng.random() >= 0.8:
        return view
    bcs = (max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    blends = (adjust_brightness, adjust_contrast, adjust_saturation)
    for op in rng.permutation(4):
        if op < 3:
            view = blends[op](view, rng.uniform(*bcs))
        else:
            view = adjust_hue(view, rng.uniform(-min(0.5, 0.2 * strength), min(0.5, 0.2 * strength)))
    return view


def _flip(rng: np.random.Generator, view: np.ndarray) -> np.ndarray:
    return cv2.flip(view, 1) if rng.random() < 0.5 else view


def simclr_augment(
    rng: np.random.Generator, image: np.ndarray | Image.Image, size: int, cfg: ViewsConfig, scale=None
) -> np.ndarray:
    """One SimCLR annotation view (size, size, 3) uint8.

    RandomResizedCrop(scale or annotation_scale, ratio) -> horizontal flip -> colour jitter (p=0.8)
    -> grayscale (p=grayscale_p) -> Gaussian blur (p=blur_p). SimCLR's sigma range [0.1, 2] is for
    224-px views (kernel = 10% of the side); it is scaled with the view side so small test/demo
    views are blurred by the same fraction of their extent, not wiped out.
    """
    rgb = _rgb(image)
    box = sample_boxes(rng, rgb.shape[0], rgb.shape[1], 1, scale or cfg.annotation_scale, cfg.ratio)
    view = _flip(rng, _crop_resize(rgb, box[0], size))
    view = colour_jitter(rng, view, cfg.color_jitter)
    if rng.random() < cfg.grayscale_p:
        view = cv2.cvtColor(_grey(view), cv2.COLOR_GRAY2RGB)
    if rng.random() < cfg.blur_p:
        view = gaussian_blur(view, rng.uniform(0.1, 2.0) * size / 224)
    return view


def make_views(
    image: np.ndarray | Image.Image,
    rng: np.random.Generator,
    cfg: ViewsConfig,
    into: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All views of one image (written into `into`'s arrays when given: the crop stage's batch rows).

    Returns {"views": (M, S, S, 3) uint8, "boxes": (M, 4) float32 xyxy in the image's [0, 1]
    frame, "ann_views": (A, S, S, 3) uint8}, plus "local_views": (L, s, s, 3) uint8 when
    `cfg.local_views` > 0 (DINO's multi-crop: small crops of `local_scale` at `local_size` px with
    the same SimCLR augmentation, drawn after every other view so the others do not change). The M
    AB crops are un-augmented by default: their relation is carried by the boxes.
    `cfg.augment_views` (ablation) adds flip + colour jitter to them; the boxes are left as sampled.
    """
    rgb = _rgb(image)
    height, width = rgb.shape[:2]
    size = cfg.view_size
    if cfg.pair_sampling == "iid" or cfg.num_views < 2:
        boxes_px = sample_boxes(rng, height, width, cfg.num_views, cfg.scale, cfg.ratio)
    else:  # Fig. 3's crop-distance control: same box marginal, crops grouped near/far by IoU
        pool = sample_boxes(rng, height, width, cfg.num_views * max(cfg.pair_pool, 1), cfg.scale, cfg.ratio)
        boxes_px = select_boxes(pool, cfg.num_views, cfg.pair_sampling, rng)
    crops = _crops(rgb, boxes_px, size)
    if cfg.augment_views:
        crops = [colour_jitter(rng, _flip(rng, c), cfg.color_jitter) for c in crops]
    boxes = (boxes_px / np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)
    ann = [simclr_augment(rng, rgb, size, cfg) for _ in range(cfg.annotation_views)]
    into = into or {}
    if "boxes" in into:
        into["boxes"][...] = boxes
        boxes = into["boxes"]
    out = {
        "views": _stack(crops, size, into.get("views")),
        "boxes": boxes,
        "ann_views": _stack(ann, size, into.get("ann_views")),
    }
    if cfg.local_views > 0:
        local = [simclr_augment(rng, rgb, cfg.local_size, cfg, cfg.local_scale) for _ in range(cfg.local_views)]
        out["local_views"] = _stack(local, cfg.local_size, into.get("local_views"))
    return out
