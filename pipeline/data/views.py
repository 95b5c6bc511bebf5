"""Multi-view sampling for one decoded image: AB's M crops with their boxes, and SimCLR views.

The image is decoded once by the caller; every view is cut from that one array. Boxes follow
torchvision's RandomResizedCrop.get_params distribution exactly (area fraction uniform in `scale`,
log-uniform aspect ratio in `ratio`, 10 tries, then a central fallback crop), with a numpy RNG so
the CPU workers need no torch state.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.config import ViewsConfig


def sample_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box as pixel (x0, y0, x1, y1), the same rule as get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def sample_boxes(rng: np.random.Generator, height: int, width: int, num: int, scale, ratio) -> np.ndarray:
    """`num` independent boxes, (num, 4) float64 pixel xyxy."""
    return np.array([sample_box(rng, height, width, scale, ratio) for _ in range(num)], dtype=np.float64)


def cut_crops(image: Image.Image, boxes_px: np.ndarray, size: int) -> list[Image.Image]:
    """Crop+resize each box from the decoded image in one antialiased PIL call (sub-pixel exact)."""
    return [image.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in b)) for b in boxes_px]


def to_array(views: list[Image.Image], size: int) -> np.ndarray:
    if not views:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([np.asarray(v) for v in views])


def cut_views(image: Image.Image, boxes_px: np.ndarray, size: int) -> np.ndarray:
    """(num, size, size, 3) uint8 views of the given pixel boxes."""
    return to_array(cut_crops(image, boxes_px, size), size)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]) through PIL's HSV mode (wraps around)."""
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda x, d=int(round(shift * 255)): (x + d) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def colour_distort(rng: np.random.Generator, view: Image.Image, cfg: ViewsConfig) -> Image.Image:
    """SimCLR's colour distortion on one view: jitter (p=0.8, random order), grayscale, blur.

    PIL's C implementations: several times cheaper per view than tensor ops on a CPU worker.
    """
    s = cfg.color_jitter
    if s > 0 and rng.random() < 0.8:
        for op in rng.permutation(4):
            if op == 0:
                view = ImageEnhance.Brightness(view).enhance(rng.uniform(max(0, 1 - 0.8 * s), 1 + 0.8 * s))
            elif op == 1:
                view = ImageEnhance.Contrast(view).enhance(rng.uniform(max(0, 1 - 0.8 * s), 1 + 0.8 * s))
            elif op == 2:
                view = ImageEnhance.Color(view).enhance(rng.uniform(max(0, 1 - 0.8 * s), 1 + 0.8 * s))
            else:
                view = _shift_hue(view, rng.uniform(-0.2 * s, 0.2 * s))
    if rng.random() < cfg.grayscale_p:
        view = view.convert("L").convert("RGB")
    if rng.random() < cfg.blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * view.size[0] / 224))
    return view


def augmented_views(rng: np.random.Generator, image: Image.Image, num: int, size: int, scale, cfg: ViewsConfig) -> np.ndarray:
    """`num` SimCLR views: random resized crop, horizontal flip, colour distortion."""
    width, height = image.size
    crops = cut_crops(image, sample_boxes(rng, height, width, num, scale, cfg.ratio), size)
    return to_array([_flip_and_distort(rng, c, cfg) for c in crops], size)


def _flip_and_distort(rng: np.random.Generator, view: Image.Image, cfg: ViewsConfig) -> Image.Image:
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return colour_distort(rng, view, cfg)


def make_views(image: np.ndarray | Image.Image, rng: np.random.Generator, cfg: ViewsConfig) -> dict[str, np.ndarray]:
    """All views of one image: M AB crops + boxes (in the image's [0,1] frame) and A SimCLR views."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    width, height = pil.size
    boxes_px = sample_boxes(rng, height, width, cfg.num_views, cfg.scale, cfg.ratio)
    crops = cut_crops(pil, boxes_px, cfg.view_size)
    if cfg.augment_views:  # ablation: the paper finds augmenting the AB crops hurts
        crops = [_flip_and_distort(rng, c, cfg) for c in crops]
    boxes = (boxes_px / np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)
    ann = augmented_views(rng, pil, cfg.annotation_views, cfg.view_size, cfg.annotation_scale, cfg)
    return {"views": to_array(crops, cfg.view_size), "boxes": boxes, "ann_views": ann}
