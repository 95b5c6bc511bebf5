"""A sample's text annotations: its captions, or its boxes + class names written as text.

The AB paper trains AB_CLIP (and the CLIP/SLIP baselines) on two kinds of COCO annotations (Table
3): captions, and bounding boxes. Every method there scores annotations with a CLIP text tower, so
box annotations are turned into a string per image. The paper does not give the format; ours lists
the objects largest first (by box area), either as class names with counts ("2 person, dog"), or
with each box's corners quantised into `box_bins` bins of the image ("person 12 40 88 95, ...",
the pix2seq/CapPa way of putting boxes into text). A sample without the requested annotation
raises `MissingAnnotation` with a skip reason from schema.py, so the crop stage can count it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np

from pipeline.config import TextViewsConfig
from pipeline.data.schema import BAD_ANNOTATION, NO_BOXES, NO_CAPTION

SOURCES = ("none", "captions", "boxes")
BOX_FORMATS = ("names", "names_boxes")


class MissingAnnotation(Exception):
    """The sample cannot give the text annotation asked for; `reason` is a schema skip reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_text_config(cfg: TextViewsConfig) -> None:
    from pipeline.config import ConfigError

    if cfg.source not in SOURCES:
        raise ConfigError(f"views.text.source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
    if cfg.box_format not in BOX_FORMATS:
        raise ConfigError(f"views.text.box_format must be one of {', '.join(BOX_FORMATS)}, got {cfg.box_format!r}")
    if cfg.context_length < 2 or cfg.box_bins < 1 or cfg.max_objects < 1:
        raise ConfigError("views.text.context_length must be >= 2, views.text.box_bins and views.text.max_objects >= 1")


def _meta(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        data = json.loads(bytes(raw) if not isinstance(raw, str) else raw)
    except (TypeError, ValueError) as exc:
        raise MissingAnnotation(BAD_ANNOTATION, f"unreadable json: {exc}") from None
    if not isinstance(data, dict):
        raise MissingAnnotation(BAD_ANNOTATION, "json is not an object")
    return data


def captions_of(meta: dict[str, Any], txt: Any = None) -> list[str]:
    """Non-empty captions from json `captions`, else the `txt` member; NO_CAPTION when none."""
    raw = meta.get("captions") or []
    if isinstance(raw, str):
        raw = [raw]
    captions = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
    if not captions and txt is not None:
        text = txt.decode("utf-8", "replace") if isinstance(txt, (bytes, bytearray, np.bytes_)) else str(txt)
        captions = [text.strip()] if text.strip() else []
    if not captions:
        raise MissingAnnotation(NO_CAPTION)
    return captions


def _objects(meta: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, pixel xyxy) pairs, validated."""
    boxes, labels = meta.get("boxes"), meta.get("labels")
    if not boxes or not labels:
        raise MissingAnnotation(NO_BOXES)
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        raise MissingAnnotation(
            BAD_ANNOTATION,
            f"{len(boxes) if isinstance(boxes, list) else '?'} boxes vs "
            f"{len(labels) if isinstance(labels, list) else '?'} labels",
        )
    objects = []
    for box, label in zip(boxes, labels):
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise MissingAnnotation(BAD_ANNOTATION, f"box {box!r} is not 4 numbers") from None
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise MissingAnnotation(BAD_ANNOTATION, f"box {box!r} is not a finite xyxy box")
        name = str(label).strip()
        if not name:
            raise MissingAnnotation(BAD_ANNOTATION, "empty label")
        objects.append((name, [x0, y0, x1, y1]))
    return objects


def boxes_text(meta: dict[str, Any], cfg: TextViewsConfig) -> str:
    """The sample's boxes + labels as one string, largest boxes first (ties: json order)."""
    objects = _objects(meta)
    order = sorted(
        range(len(objects)),
        key=lambda i: -(objects[i][1][2] - objects[i][1][0]) * (objects[i][1][3] - objects[i][1][1]),
    )
    kept = [objects[i] for i in order[: cfg.max_objects]]
    if cfg.box_format == "names":
        counts = Counter(name for name, _ in kept)
        names = list(dict.fromkeys(name for name, _ in kept))  # first appearance = largest box of that class
        return ", ".join(name if counts[name] == 1 else f"{counts[name]} {name}" for name in names)
    width, height = meta.get("width"), meta.get("height")
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)) or width <= 0 or height <= 0:
        raise MissingAnnotation(BAD_ANNOTATION, "names_boxes needs the json's width and height")
    bins = cfg.box_bins
    parts = []
    for name, (x0, y0, x1, y1) in kept:
        q = [
            min(bins - 1, max(0, int(v / side * bins)))
            for v, side in ((x0, width), (y0, height), (x1, width), (y1, height))
        ]
        parts.append(f"{name} {q[0]} {q[1]} {q[2]} {q[3]}")
    return ", ".join(parts)


def annotation_texts(raw_meta: Any, txt: Any, cfg: TextViewsConfig) -> list[str]:
    """Every string the sample offers for `cfg.source` (one is picked per epoch), or MissingAnnotation."""
    if cfg.source == "captions":
        try:
            meta = _meta(raw_meta)
        except MissingAnnotation:
            if txt is None:
                raise
            meta = {}  # an unreadable json does not hide a caption in `txt`
        return captions_of(meta, txt)
    meta = _meta(raw_meta)
    if cfg.source == "boxes":
        return [boxes_text(meta, cfg)]
    raise ValueError(f"views.text.source={cfg.source!r} asks for no text")


def pick(texts: list[str], rng: np.random.Generator) -> str:
    """One string per image per epoch (COCO has 5 captions per image)."""
    return texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
