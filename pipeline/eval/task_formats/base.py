"""What every task adapter returns, and the checks they share.

Adapters turn a dataset's *official* on-disk layout into `Example`s; they never move or convert
files, so the user points `root` at the folder they downloaded. A layout problem raises
`TaskFormatError` naming the file and what was expected: a probe run on silently half-read data
would report a number that looks valid and is not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.eval.probe_data import TaskInfo

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MISSING_SHOWN = 5  # how many missing files an error lists by name


class TaskFormatError(ValueError):
    """A task dataset that does not match its expected layout; the message names the file."""


@dataclass
class Example:
    input: str  # path of an image file (JPEG/PNG) readable with open()
    label: int | None = None  # classification / counting / distance target (class id)
    boxes: np.ndarray | None = None  # (K, 4) float32 xyxy in the FULL image's [0, 1] frame
    box_labels: np.ndarray | None = None  # (K,) int64 class ids
    captions: list[str] | None = None  # retrieval: the image's captions (task_formats/captions.py)


@dataclass
class TaskData:
    info: TaskInfo
    train: list[Example]
    test: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)  # "<split>/<reason>" -> count, never silent


@dataclass
class SplitData:
    """What an adapter's split reader returns: examples plus what it left out, by reason."""

    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)


def find_base(root: str, folder: str, marker: str) -> str:
    """The dataset's top folder: `root/folder`, or `root` itself when it is that folder.

    Users point at either the folder an archive was extracted into or the archive's top folder;
    `marker` (an entry the top folder always has) tells them apart. Otherwise `root/folder`, so
    the error names the official folder name.
    """
    inner = os.path.join(root, folder)
    if os.path.isdir(inner):
        return inner
    if os.path.exists(os.path.join(root, marker)) or os.path.basename(os.path.normpath(root)) == folder:
        return root
    return inner


def need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise TaskFormatError(f"{path}: missing ({what})")
    return path


def need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise TaskFormatError(f"{path}: missing folder ({what})")
    return path


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-# lines of a text file."""
    need_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, ln.strip()) for i, ln in enumerate(f, 1)]
    except UnicodeDecodeError as exc:
        raise TaskFormatError(f"{path}: not a UTF-8 text file ({what}): {exc}") from None
    return [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]


def read_json(path: str, what: str):
    need_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskFormatError(f"{path}: not valid JSON ({what}): {exc}") from None


def check_label(label: int, num_classes: int, where: str) -> int:
    """A class id outside the class list means the annotations and the class list disagree."""
    if not 0 <= label < num_classes:
        raise TaskFormatError(f"{where}: class id {label} outside the {num_classes} classes of the class list")
    return label


def box_example(path: str, boxes: list, labels: list, skipped: Counter, keep_empty: bool) -> Example | None:
    """An image's boxes (normalised xyxy, clipped to [0, 1]) and their classes as one Example;
    None, counted as `no_boxes`, when it kept no box and empty images are not wanted."""
    if not boxes and not keep_empty:
        skipped["no_boxes"] += 1
        return None
    return Example(
        input=path,
        boxes=np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0),
        box_labels=np.asarray(labels, np.int64),
    )


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_class_folders(base: str) -> list[str]:
    """Sorted class sub-folder names (hidden ones ignored): sorted so class ids are stable."""
    return sorted(d for d in os.listdir(base) if not d.startswith(".") and os.path.isdir(os.path.join(base, d)))


def list_folder_images(folder: str) -> tuple[list[str], int]:
    """(sorted image paths under folder, recursively; number of non-image files left out)."""
    images, others = [], 0
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if is_image_name(name):
                images.append(os.path.join(here, name))
            else:
                others += 1
    return images, others


def check_inputs_exist(examples: list[Example], split: str) -> None:
    """Every listed image must be there: a probe scored on a partial test set is not comparable."""
    missing = [ex.input for ex in examples if not os.path.isfile(ex.input)]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN])
        more = f" (and {len(missing) - MISSING_SHOWN} more)" if len(missing) > MISSING_SHOWN else ""
        raise TaskFormatError(
            f"{len(missing)} image(s) of the {split} split listed by the annotations are missing: {shown}{more}"
        )


def subsample(examples: list[Example], max_count: int | None, seed: int) -> list[Example]:
    """A seeded random subset, kept in dataset order, so runs with the same seed see the same images."""
    if max_count is None or len(examples) <= max_count:
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_count, replace=False))
    return [examples[i] for i in keep]


def seeded_split(items_by_class: dict[int, list], test_fraction: float, seed: int) -> tuple[list, list]:
    """Per-class seeded split (train, test): every class with >= 2 items lands in both splits."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in sorted(items_by_class):
        items = items_by_class[cls]
        order = rng.permutation(len(items))
        n_test = min(max(1, round(len(items) * test_fraction)), len(items) - 1) if len(items) >= 2 else 0
        test_idx = set(order[:n_test].tolist())
        for i, item in enumerate(items):
            (test if i in test_idx else train).append(item)
    return train, test
