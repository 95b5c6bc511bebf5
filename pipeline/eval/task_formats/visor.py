"""EPIC-KITCHENS VISOR sparse annotations: objects in a box, and detection, on kitchen frames.

VISOR gives polygons only (`video_annotations[].annotations[].segments`, in the 1920x1080 frame
the annotators saw); a box is the extent of all of an object's polygons, divided by 1920x1080, so
it stays right for frames stored at any size with that aspect. Classes are the closed-vocabulary
nouns of EPIC_100_noun_classes_v2.csv (`class_id`). VISOR train is the train split, val the test
split. Objects with no polygon points or a zero-area extent are left out and counted; frames of
videos whose zip is not extracted here are counted as `video_not_extracted`.
"""

from __future__ import annotations

import glob
import os
from collections import Counter

import numpy as np

from pipeline.eval.task_formats.base import (
    Example,
    SplitData,
    TaskFormatError,
    box_example,
    check_label,
    find_base,
    need_dir,
    need_file,
    read_json,
)
from pipeline.eval.task_formats.epic import read_class_csv

ANNOTATION_SIZE = (1920.0, 1080.0)  # (width, height) of the frame VISOR's polygons are drawn in
CLASSES_CSV = "EPIC_100_noun_classes_v2.csv"
SPLITS = {"train": "train", "test": "val"}
LAYOUT = """\
root/GroundTruth-SparseAnnotations/annotations/train/PXX_YY.json, annotations/val/PXX_YY.json
root/GroundTruth-SparseAnnotations/rgb_frames/train/PXX/PXX_YY/PXX_YY_frame_0000000140.jpg
    (each rgb_frames/<split>/PXX/PXX_YY.zip extracted into a folder of that name)
root/EPIC_100_noun_classes_v2.csv (VISOR's class list; may also sit in GroundTruth-SparseAnnotations/)"""


def polygon_box(segments: list) -> list[float] | None:
    """xyxy extent of all polygon points in VISOR's 1920x1080 frame, as [0, 1]; None if no points."""
    points = [pt for polygon in segments for pt in polygon]
    if not points:
        return None
    xy = np.asarray(points, np.float64).reshape(-1, 2)
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    w, h = ANNOTATION_SIZE
    return [x0 / w, y0 / h, x1 / w, y1 / h]


def _read_video(path: str, frames: str, num_classes: int, keep_empty: bool, skipped: Counter) -> list[Example]:
    data = read_json(path, "VISOR sparse annotations")
    entries = data.get("video_annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TaskFormatError(f"{path}: no 'video_annotations' list")
    examples = []
    for i, entry in enumerate(entries):
        try:
            name, objects = entry["image"]["name"], entry["annotations"]
        except (KeyError, TypeError):
            raise TaskFormatError(f"{path}: video_annotations[{i}] lacks image.name / annotations") from None
        video = entry["image"].get("video") or os.path.splitext(os.path.basename(path))[0]
        video_dir = os.path.join(frames, video.split("_")[0], video)
        if not os.path.isdir(video_dir):
            skipped["video_not_extracted"] += 1
            continue
        boxes, labels = [], []
        for obj in objects:
            where = f"{path}: {name} object {obj.get('id', '?')}"
            try:
                box, label = polygon_box(obj["segments"]), int(obj["class_id"])
            except (KeyError, TypeError, ValueError):
                raise TaskFormatError(
                    f"{where}: needs 'segments' ([[x, y], ...] polygons) and an integer 'class_id'"
                ) from None
            check_label(label, num_classes, where)
            if box is None:
                skipped["empty_segments"] += 1
            elif box[2] <= box[0] or box[3] <= box[1]:
                skipped["empty_box"] += 1
            else:
                boxes.append(box)
                labels.append(label)
        example = box_example(os.path.join(video_dir, name), boxes, labels, skipped, keep_empty)
        if example is not None:
            examples.append(example)
    return examples


def _classes_file(base: str) -> str:
    for folder in (os.path.dirname(os.path.abspath(base)), base):
        if os.path.isfile(os.path.join(folder, CLASSES_CSV)):
            return os.path.join(folder, CLASSES_CSV)
    return need_file(os.path.join(os.path.dirname(os.path.abspath(base)), CLASSES_CSV), "VISOR noun class list")


def _load(root: str, keep_empty: bool):
    base = need_dir(
        find_base(root, "GroundTruth-SparseAnnotations", "annotations"), "VISOR GroundTruth-SparseAnnotations"
    )
    classes = read_class_csv(_classes_file(base))
    splits = []
    for split in SPLITS.values():
        annotations = need_dir(os.path.join(base, "annotations", split), f"VISOR {split} annotation jsons")
        frames = need_dir(os.path.join(base, "rgb_frames", split), f"VISOR {split} frames")
        files = sorted(glob.glob(os.path.join(annotations, "*.json")))
        if not files:
            raise TaskFormatError(f"{annotations}: no PXX_YY.json files")
        examples, skipped = [], Counter()
        for path in files:
            examples += _read_video(path, frames, len(classes), keep_empty, skipped)
        if not examples:
            raise TaskFormatError(
                f"{frames}: no frames extracted for any of the {len(files)} annotated videos (unzip PXX/PXX_YY.zip "
                "into PXX/PXX_YY/)"
            )
        splits.append(SplitData(examples, skipped))
    return classes, splits[0], splits[1]


def load_objects(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, keep_empty=False)


def load_detection(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, keep_empty=True)
