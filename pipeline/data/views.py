"""Multi-view sampling for one decoded image: AB's M crops with their boxes, and SimCLR views.

The image is decoded once by the caller; every view is cut from that one array, so decode cost
is paid once per image however many views it yields. Boxes follow torchvision's
RandomResizedCrop.get_params distribution exactly (area fraction uniform in `scale`, log-uniform
aspect ratio in `ratio`, integer sides by round(), 10 tries, then the central fallback crop), drawn
from a numpy Generator so CPU workers carry no global torch RNG state and every image has its own
reproducible stream. The SimCLR colour distortion uses Pillow's C ops for brightness, contrast and
saturation, and OpenCV for the hue rotation and the blur, several times cheaper per view than
tensor ops on a CPU worker (and than Pillow's HSV round trip and box-blur Gaussian: ~6x each).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from pipeline.config import ViewsConfig
from pipeline.data.pair_sampling import select_boxes

TRIES = 10  # get_params' number of attempts before the fallback

# A crop actor is given one CPU (views.cpus_per_actor): OpenCV's own thread pool would oversubscribe it.
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


def _pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))


def _crop_resize(image: Image.Image, box, size: int) -> Image.Image:
    """Crop+resize one float xyxy box with antialiased bilinear, as RandomResizedCrop does.

    Pillow's `resize(box=...)` alone would let the filter read pixels outside the box near its
    edges (its support is clipped to the image, not the box), so the box is first cut to its
    enclosing integer pixels: no content from outside the box leaks in. The remaining float offset
    goes to `resize(box=...)`, so a view is sub-pixel exactly its normalised box. No
    `reducing_gap`: it would trade that exactness for speed, and the JPEG draft decode already
    bounds how far a view is downscaled.
    """
    # Snap float noise (e.g. a float32-normalised box mapped back to pixels) to the whole pixel it
    # means: otherwise 39.99999 would pull pixel 39 into the filter's support.
    x0, y0, x1, y1 = (round(v) if abs(v - round(v)) < 1e-4 else v for v in map(float, box))
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(image.width, math.ceil(x1)), min(image.height, math.ceil(y1))
    region = image.crop((ix0, iy0, ix1, iy1))
    return region.resize((size, size), Image.BILINEAR, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))


def _crops(image: Image.Image, boxes_px: np.ndarray, size: int) -> list[Image.Image]:
    return [_crop_resize(image, b, size) for b in np.asarray(boxes_px, dtype=np.float64)]


def _stack(views: list[Image.Image], size: int) -> np.ndarray:
    if not views:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([np.asarray(v) for v in views])


def cut_views(image: np.ndarray | Image.Image, boxes_px: np.ndarray, size: int) -> np.ndarray:
    """(num, size, size, 3) uint8 views of the given pixel xyxy boxes of an HWC uint8 image."""
    return _stack(_crops(_pil(image), boxes_px, size), size)


_HUE_STEPS = 256  # OpenCV's 8-bit "FULL" HSV stores hue as h * 256 (one turn = 256 steps)


def _shift_hue(view: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]) through OpenCV's 8-bit full-range HSV."""
    hsv = cv2.cvtColor(np.asarray(view), cv2.COLOR_RGB2HSV_FULL)
    d = round(shift * _HUE_STEPS)
    lut = ((np.arange(256) + d) % _HUE_STEPS).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


def gaussian_blur(view: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` px, kernel +-3 sigma, reflected borders
    (torchvision's GaussianBlur pads the same way)."""
    return Image.fromarray(cv2.GaussianBlur(np.asarray(view), (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101))


def colour_jitter(rng: np.random.Generator, view: Image.Image, strength: float) -> Image.Image:
    """SimCLR's RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8), ops in random order.

    Pillow's enhancers blend with the same references as torchvision's ColorJitter (black for
    brightness, the grey mean for contrast, the greyscale image for saturation).
    """
    if strength <= 0 or rng.random() >= 0.8:
        return view
    bcs = (max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in rng.permutation(4):
        if op < 3:
            view = enhancers[op](view).enhance(rng.uniform(*bcs))
        else:
            view = _shift_hue(view, rng.uniform(-min(0.5, 0.2 * strength), min(0.5, 0.2 * strength)))
    return view


def _flip(rng: np.random.Generator, view: Image.Image) -> Image.Image:
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def simclr_augment(rng: np.random.Generator, image: np.ndarray | Image.Image, size: int, cfg: ViewsConfig, scale=None) -> np.ndarray:
    """One SimCLR annotation view (size, size, 3) uint8.

    RandomResizedCrop(scale or annotation_scale, ratio) -> horizontal flip -> colour jitter (p=0.8)
    -> grayscale (p=grayscale_p) -> Gaussian blur (p=blur_p). SimCLR's sigma range [0.1, 2] is for
    224-px views (kernel = 10% of the side); it is scaled with the view side so small test/demo
    views are blurred by the same fraction of their extent, not wiped out.
    """
    pil = _pil(image)
    box = sample_boxes(rng, pil.height, pil.width, 1, scale or cfg.annotation_scale, cfg.ratio)
    view = _flip(rng, _crops(pil, box, size)[0])
    view = colour_jitter(rng, view, cfg.color_jitter)
    if rng.random() < cfg.grayscale_p:
        view = view.convert("L").convert("RGB")
    if rng.random() < cfg.blur_p:
        view = gaussian_blur(view, rng.uniform(0.1, 2.0) * size / 224)
    return np.asarray(view)


def make_views(image: np.ndarray | Image.Image, rng: np.random.Generator, cfg: ViewsConfig) -> dict[str, np.ndarray]:
    """All views of one image.

    Returns {"views": (M, S, S, 3) uint8, "boxes": (M, 4) float32 xyxy in the image's [0, 1]
    frame, "ann_views": (A, S, S, 3) uint8}, plus "local_views": (L, s, s, 3) uint8 when
    `cfg.local_views` > 0 (DINO's multi-crop: small crops of `local_scale` at `local_size` px with
    the same SimCLR augmentation, drawn after every other view so the others do not change). The M
    AB crops are un-augmented by default: their relation is carried by the boxes.
    `cfg.augment_views` (ablation) adds flip + colour jitter to them; the boxes are left as sampled.
    """
    pil = _pil(image)
    width, height = pil.size
    size = cfg.view_size
    if cfg.pair_sampling == "iid" or cfg.num_views < 2:
        boxes_px = sample_boxes(rng, height, width, cfg.num_views, cfg.scale, cfg.ratio)
    else:  # Fig. 3's crop-distance control: same box marginal, crops grouped near/far by IoU
        pool = sample_boxes(rng, height, width, cfg.num_views * max(cfg.pair_pool, 1), cfg.scale, cfg.ratio)
        boxes_px = select_boxes(pool, cfg.num_views, cfg.pair_sampling, rng)
    crops = _crops(pil, boxes_px, size)
    if cfg.augment_views:
        crops = [colour_jitter(rng, _flip(rng, c), cfg.color_jitter) for c in crops]
    boxes = (boxes_px / np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)
    ann = [simclr_augment(rng, pil, size, cfg) for _ in range(cfg.annotation_views)]
    out = {
        "views": _stack(crops, size),
        "boxes": boxes,
        "ann_views": np.stack(ann) if ann else np.zeros((0, size, size, 3), np.uint8),
    }
    if cfg.local_views > 0:
        local = [simclr_augment(rng, pil, cfg.local_size, cfg, cfg.local_scale) for _ in range(cfg.local_views)]
        out["local_views"] = np.stack(local)
    return out
