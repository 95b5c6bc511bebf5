"""COCO: an images folder + `instances_*.json` (+ optional `captions_*.json`) -> ingest items.

Boxes become pixel xyxy in the json's image size (`box_frame`; the shard writer rescales them to the
stored image), labels are category names, one per box. Every box that does not make it is counted
by reason in the item's `counts` (summed into `_stats.json` -> `annotations`):
  boxes_dropped_crowd       iscrowd=1 (RLE crowd regions), unless ingest.coco.include_crowd
  boxes_dropped_degenerate  malformed bbox, zero/negative size, or nothing left after clipping to
                            the image (or a side below ingest.coco.min_box_side)
  boxes_dropped_unknown_category  category_id absent from `categories`
  boxes_clipped             kept, but cut to the image
Images without annotations are kept (no boxes). An image listed in the json but absent on disk is
counted `missing` by the shard writer; an unusable image entry is counted `bad_annotation`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline import console
from pipeline.config import ConfigError, IngestConfig, InputError
from pipeline.data.schema import BAD_ANNOTATION
from pipeline.storage import join, read_bytes


def _load_json(uri: str, what: str) -> dict:
    try:
        data = json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: file not found: {uri}") from None
    except ValueError as exc:
        raise InputError(f"{what}: {uri} is not valid json: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {uri} must hold a json object")
    return data


def _section(data: dict, key: str, uri: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise InputError(f"{uri}: missing or malformed '{key}' list (not a COCO annotation file?)")
    return value


def coco_box(bbox: Any, width: float, height: float, min_side: float) -> tuple[list[float] | None, bool]:
    """COCO [x, y, w, h] -> clipped pixel [x0, y0, x1, y1], or None when degenerate; and whether clipped."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, False
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None, False
    box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
    if box[2] - box[0] < max(min_side, 1e-9) or box[3] - box[1] < max(min_side, 1e-9):
        return None, False
    return box, box != [x, y, x + w, y + h]


def _captions(uri: str) -> dict[Any, list[str]]:
    data = _load_json(uri, "ingest.coco.captions")
    by_image: dict[Any, list[tuple[Any, str]]] = {}
    for ann in _section(data, "annotations", uri):
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and "image_id" in ann:
            by_image.setdefault(ann["image_id"], []).append((ann.get("id", 0), ann["caption"].strip()))
    return {image_id: [text for _, text in caps] for image_id, caps in by_image.items()}  # file order


def _image_item(image: Any, images_dir: str, seen: set) -> dict[str, Any]:
    """The item for one `images[]` entry (or a `bad_annotation` skip naming what is wrong with it)."""
    if not isinstance(image, dict):
        return {
            "input": str(image)[:200],
            "id": str(image)[:200],
            "skip": [BAD_ANNOTATION, "images[] entry is not an object"],
        }
    image_id, file_name = image.get("id"), image.get("file_name")
    label = file_name if isinstance(file_name, str) and file_name else f"image id {image_id}"
    item: dict[str, Any] = {
        "input": join(images_dir, file_name) if isinstance(file_name, str) and file_name else label,
        "id": str(image_id),
    }
    problem = ""
    if image_id is None:
        problem = "no id"
    elif not isinstance(file_name, str) or not file_name:
        problem = "no file_name"
    elif not all(isinstance(image.get(k), (int, float)) and image.get(k) > 0 for k in ("width", "height")):
        problem = f"width/height missing or not positive: {image.get('width')!r}x{image.get('height')!r}"
    elif image_id in seen:
        problem = f"duplicate image id {image_id}"
    if problem:
        item["skip"] = [BAD_ANNOTATION, f"{label}: {problem}"]
    seen.add(image_id)
    return item


def list_items(cfg: IngestConfig) -> list[dict[str, Any]]:
    """One item per image in `ingest.coco.instances` (sorted by file name), images from `ingest.input`."""
    coco = cfg.coco
    if not coco.instances:
        raise ConfigError("ingest.coco.instances is required (the instances_*.json file)")
    if not cfg.input:
        raise ConfigError("ingest.input is required for coco (the images folder)")
    data = _load_json(coco.instances, "ingest.coco.instances")
    images = _section(data, "images", coco.instances)
    annotations = _section(data, "annotations", coco.instances)
    categories = {
        c.get("id"): str(c.get("name")) for c in _section(data, "categories", coco.instances) if isinstance(c, dict)
    }
    captions = _captions(coco.captions) if coco.captions else {}

    by_image: dict[Any, list[dict]] = {}
    for ann in annotations:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)

    seen: set = set()
    items = []
    for image in images:
        item = _image_item(image, cfg.input, seen)
        if "skip" not in item:
            _attach_annotations(item, image, by_image.get(image["id"], []), categories, coco)
            if captions.get(image["id"]):
                item["captions"] = captions[image["id"]]
        items.append(item)
    orphans = sum(len(anns) for image_id, anns in by_image.items() if image_id not in seen)
    if orphans:
        console.note(
            f"ingest coco: {orphans} annotations name an image id absent from 'images' in {coco.instances}; ignored"
        )
    return sorted(items, key=lambda it: (it["input"], it["id"]))


def _attach_annotations(item: dict, image: dict, anns: list[dict], categories: dict, coco) -> None:
    width, height = float(image["width"]), float(image["height"])
    counts = {
        "boxes_kept": 0,
        "boxes_kept_crowd": 0,
        "boxes_clipped": 0,
        "boxes_dropped_crowd": 0,
        "boxes_dropped_degenerate": 0,
        "boxes_dropped_unknown_category": 0,
    }
    boxes, labels = [], []
    for ann in anns:  # file order: boxes[i] and labels[i] follow the json
        crowd = bool(ann.get("iscrowd", 0))
        if crowd and not coco.include_crowd:
            counts["boxes_dropped_crowd"] += 1
            continue
        if ann.get("category_id") not in categories:
            counts["boxes_dropped_unknown_category"] += 1
            continue
        box, clipped = coco_box(ann.get("bbox"), width, height, coco.min_box_side)
        if box is None:
            counts["boxes_dropped_degenerate"] += 1
            continue
        boxes.append(box)
        labels.append(categories[ann["category_id"]])
        counts["boxes_kept"] += 1
        counts["boxes_kept_crowd"] += crowd
        counts["boxes_clipped"] += clipped
    item.update(boxes=boxes, labels=labels, box_frame=[width, height], counts={k: int(v) for k, v in counts.items()})
