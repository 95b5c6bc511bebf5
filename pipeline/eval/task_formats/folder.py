"""ImageNet-style class folders: `root/train/<class>/*` + `root/val/<class>/*`, or `root/<class>/*`.

Without train/val folders the images are split per class by the seed (FOLDER_TEST_FRACTION held
out), the same stratified scheme the labelled-folder eval has always used.
"""

from __future__ import annotations

import os
from collections import Counter

from pipeline.eval.task_formats.base import (
    Example,
    SplitData,
    TaskFormatError,
    is_image_name,
    list_class_folders,
    list_folder_images,
    need_dir,
    seeded_split,
)

FOLDER_TEST_FRACTION = 0.3
LAYOUT = """\
root/train/<class>/<image>.jpg     (ImageNet: train/n01440764/n01440764_10026.JPEG)
root/val/<class>/<image>.jpg       (every val class must also be a train class)
or, with no train/ and val/: root/<class>/<image>.jpg, split per class by the seed (30% test)"""


def _read_split(base: str, class_names: list[str]) -> SplitData:
    loose = [n for n in os.listdir(base) if is_image_name(n) and os.path.isfile(os.path.join(base, n))]
    if loose:
        raise TaskFormatError(
            f"{base}: {len(loose)} image(s) directly in the folder (e.g. {loose[0]}); images go in class sub-folders "
            "(ImageNet's flat val/ must first be sorted into val/<wnid>/, e.g. with its valprep.sh)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    examples, skipped = [], Counter()
    for name in list_class_folders(base):
        if name not in index:
            raise TaskFormatError(
                f"{os.path.join(base, name)}: class folder not among the {len(class_names)} train classes"
            )
        images, others = list_folder_images(os.path.join(base, name))
        skipped["not_image"] += others
        examples += [Example(input=path, label=index[name]) for path in images]
    return SplitData(examples, skipped)


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    """(class names, train, test)."""
    need_dir(root, "the dataset root")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir):
        need_dir(val_dir, "ImageNet-style val split next to train/")
        classes = list_class_folders(train_dir)
        if not classes:
            raise TaskFormatError(f"{train_dir}: no class sub-folders")
        return classes, _read_split(train_dir, classes), _read_split(val_dir, classes)
    classes = list_class_folders(root)
    if not classes:
        raise TaskFormatError(f"{root}: no class sub-folders and no train/ + val/ folders")
    everything = _read_split(root, classes)
    by_class: dict[int, list[Example]] = {}
    for ex in everything.examples:
        by_class.setdefault(ex.label, []).append(ex)
    train, test = seeded_split(by_class, FOLDER_TEST_FRACTION, seed)
    return classes, SplitData(train, everything.skipped), SplitData(test)
