"""A small labelled image set read straight from a class-folder layout, for in-training readouts.

Layouts (the eval job's `folder` task reads the same ones):
  <root>/train/<class>/*.{jpg,png,...} and <root>/val/<class>/... (or test/): the two splits as given;
  <root>/<class>/*: one pool, split 70/30 per class with a seeded choice.
Each split keeps at most `max_per_class` images per class (seeded). Images are decoded once, as RGB,
resized to `size` x `size`, and returned as uint8 arrays (N, size, size, 3), the crop stage's layout.
Unreadable files are skipped and counted, never silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_TEST_SPLITS = ("val", "test")


@dataclass
class LabelledSet:
    classes: list[str]
    train_images: np.ndarray  # uint8 (N, S, S, 3)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)  # {"<split>/<reason>": count}


def _class_files(folder: str) -> dict[str, list[str]]:
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
            if files:
                out[name] = [os.path.join(path, f) for f in files]
    return out


def _pick(files: list[str], n: int, rng: np.random.Generator) -> list[str]:
    if len(files) <= n:
        return files
    return [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]


def _decode(paths: list[tuple[str, int]], size: int, split: str, skipped: dict[str, int]):
    images, labels = [], []
    for path, label in paths:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8))
            labels.append(label)
        except (OSError, UnidentifiedImageError, ValueError):
            skipped[f"{split}/unreadable"] = skipped.get(f"{split}/unreadable", 0) + 1
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def read_labelled_folder(root: str, size: int, max_per_class: int = 50, seed: int = 0) -> LabelledSet:
    """The labelled set under `root` (layouts in the module docstring); InputError when there is none."""
    if not os.path.isdir(root):
        raise InputError(f"train.online_probe.root: no such folder: {root}")
    rng = np.random.default_rng(seed)
    test_dir = next((os.path.join(root, s) for s in _TEST_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_dir:
        train_files, test_files = _class_files(os.path.join(root, "train")), _class_files(test_dir)
        classes = sorted(set(train_files) & set(test_files))
        train = {c: _pick(train_files[c], max_per_class, rng) for c in classes}
        test = {c: _pick(test_files[c], max_per_class, rng) for c in classes}
    else:
        pool = _class_files(root)
        classes = sorted(pool)
        train, test = {}, {}
        for c in classes:
            order = [pool[c][i] for i in rng.permutation(len(pool[c]))]
            cut = int(round(0.7 * len(order)))
            train[c], test[c] = order[:cut][:max_per_class], order[cut:][:max_per_class]
    if len(classes) < 2:
        raise InputError(
            f"train.online_probe.root: {root} needs at least 2 class folders with images "
            "(<root>/<class>/* or <root>/train|val/<class>/*)"
        )
    skipped: dict[str, int] = {}
    train_x, train_y = _decode([(p, i) for i, c in enumerate(classes) for p in train[c]], size, "train", skipped)
    test_x, test_y = _decode([(p, i) for i, c in enumerate(classes) for p in test[c]], size, "test", skipped)
    if not len(train_x) or not len(test_x):
        raise InputError(f"train.online_probe.root: no readable image in a split of {root} (skipped: {skipped})")
    return LabelledSet(classes, train_x, train_y, test_x, test_y, skipped)
