"""COCO 2017 instances, read with pycocotools: object classification in a box, and detection.

train2017 is the train split, val2017 the test split. Category ids (1..90 with gaps) become
contiguous class ids in id order. Crowd annotations (RLE blobs over many objects) are excluded
and counted, as are zero-area boxes; boxes are xyxy divided by the image's width/height from the
json. For object classification an image with no usable box has nothing to ask, so it is left
out and counted; detection keeps it (an empty image is a valid detection example).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter

from pipeline.eval.task_formats.base import SplitData, TaskFormatError, box_example, need_dir, need_file

SPLITS = {"train": "train2017", "test": "val2017"}
LAYOUT = """\
root/train2017/<12-digit id>.jpg, root/val2017/<12-digit id>.jpg
root/annotations/instances_train2017.json, annotations/instances_val2017.json (COCO instances format)"""


def _open(path: str):
    from pycocotools.coco import COCO

    need_file(path, "COCO instances json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(path)
    except Exception as exc:  # JSONDecodeError, KeyError, TypeError: a json that is not COCO instances
        raise TaskFormatError(f"{path}: not a COCO instances json ({type(exc).__name__}: {exc})") from None


def _class_names(coco, path: str) -> tuple[list[int], list[str]]:
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise TaskFormatError(f"{path}: no categories")
    return cat_ids, [coco.loadCats(c)[0]["name"] for c in cat_ids]


def _read_split(coco, path: str, images: str, cat_index: dict[int, int], keep_empty: bool) -> SplitData:
    examples, skipped = [], Counter()
    skipped["annotation_of_unlisted_image"] = sum(len(v) for k, v in coco.imgToAnns.items() if k not in coco.imgs)
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        try:
            width, height, file_name = float(info["width"]), float(info["height"]), info["file_name"]
        except KeyError as exc:
            raise TaskFormatError(f"{path}: image {image_id} lacks {exc}") from None
        boxes, labels = [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                skipped["crowd_box"] += 1
                continue
            if ann.get("category_id") not in cat_index:
                raise TaskFormatError(
                    f"{path}: annotation {ann.get('id')} has category_id {ann.get('category_id')}, not among the "
                    f"{len(cat_index)} categories"
                )
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise TaskFormatError(f"{path}: annotation {ann.get('id')} has no [x, y, w, h] bbox") from None
            if w <= 0 or h <= 0:
                skipped["empty_box"] += 1
                continue
            boxes.append([x / width, y / height, (x + w) / width, (y + h) / height])
            labels.append(cat_index[ann["category_id"]])
        example = box_example(os.path.join(images, file_name), boxes, labels, skipped, keep_empty)
        if example is not None:
            examples.append(example)
    return SplitData(examples, skipped)


def _load(root: str, keep_empty: bool):
    classes, cat_index, splits = None, None, []
    for folder in SPLITS.values():
        path = os.path.join(root, "annotations", f"instances_{folder}.json")
        coco = _open(path)
        cat_ids, names = _class_names(coco, path)
        if classes is None:
            classes, cat_index = names, {c: i for i, c in enumerate(cat_ids)}
        elif names != classes:
            raise TaskFormatError(
                f"{path}: {len(names)} categories differ from the {len(classes)} of instances_train2017.json"
            )
        images = need_dir(os.path.join(root, folder), f"COCO {folder} images")
        splits.append(_read_split(coco, path, images, cat_index, keep_empty))
    return classes, splits[0], splits[1]


def load_objects(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, keep_empty=False)


def load_detection(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, keep_empty=True)
