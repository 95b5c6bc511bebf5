"""CLEVR v1.0 read as VTAB's two structured tasks (Zhai et al. 2019), which the AB paper probes.

- count: number of objects in the scene, classes 3..10 (label = count - 3).
- distance: depth of the closest object (`pixel_coords[2]`), binned at VTAB's thresholds
  [0, 8.0, 8.5, 9.0, 9.5, 10.0, 100]: class i holds depths in (t_i, t_i+1].
CLEVR's train split is the train split; its val split (test has no scenes) is the test split.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.eval.task_formats.base import (
    Example,
    SplitData,
    TaskFormatError,
    check_label,
    find_base,
    need_dir,
    read_json,
)

MIN_OBJECTS, MAX_OBJECTS = 3, 10
DISTANCE_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
COUNT_CLASSES = [str(n) for n in range(MIN_OBJECTS, MAX_OBJECTS + 1)]
DISTANCE_CLASSES = [f"({lo:g}, {hi:g}]" for lo, hi in zip(DISTANCE_THRESHOLDS[:-1], DISTANCE_THRESHOLDS[1:])]
LAYOUT = """\
root/CLEVR_v1.0/images/train/CLEVR_train_000000.png, images/val/CLEVR_val_000000.png
root/CLEVR_v1.0/scenes/CLEVR_train_scenes.json, scenes/CLEVR_val_scenes.json
    ({"scenes": [{"image_filename", "objects": [{"pixel_coords": [x, y, depth], ...}]}]})"""


def count_label(objects: list) -> int:
    return len(objects) - MIN_OBJECTS


def distance_label(objects: list) -> int:
    """Index of the VTAB bin holding the closest object's depth (-1 when it is <= 0)."""
    depth = min(float(obj["pixel_coords"][2]) for obj in objects)
    return int(np.searchsorted(DISTANCE_THRESHOLDS, depth, side="left")) - 1


def _read_split(base: str, split: str, labeller, num_classes: int) -> SplitData:
    path = os.path.join(base, "scenes", f"CLEVR_{split}_scenes.json")
    data = read_json(path, f"CLEVR {split} scenes")
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        raise TaskFormatError(f"{path}: no 'scenes' list")
    images = need_dir(os.path.join(base, "images", split), f"CLEVR {split} images")
    examples = []
    for i, scene in enumerate(scenes):
        try:
            name, objects = scene["image_filename"], scene["objects"]
            label = labeller(objects) if objects else -1
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise TaskFormatError(
                f"{path}: scene {i} lacks image_filename / objects[].pixel_coords[2] ({exc!r})"
            ) from None
        check_label(label, num_classes, f"{path}: scene {i} ({name}, {len(objects)} objects)")
        examples.append(Example(input=os.path.join(images, name), label=label))
    return SplitData(examples)


def _load(root: str, labeller, num_classes: int):
    base = need_dir(find_base(root, "CLEVR_v1.0", "scenes"), "CLEVR_v1.0")
    return _read_split(base, "train", labeller, num_classes), _read_split(base, "val", labeller, num_classes)


def load_count(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return (COUNT_CLASSES, *_load(root, count_label, len(COUNT_CLASSES)))


def load_distance(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return (DISTANCE_CLASSES, *_load(root, distance_label, len(DISTANCE_CLASSES)))
