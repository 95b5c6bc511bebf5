"""NWPU-RESISC45: `NWPU-RESISC45/<class>/<class>_NNN.jpg`, split by torchgeo's published lists.

The lists `resisc45-{train,test}.txt` (one image file name a line; from the "In-domain
representation learning for remote sensing" paper, distributed by torchgeo) are what most work
uses. When neither is present, each class is split by the seed, 80% train / 20% test: VTAB's
train+val vs test proportions. `resisc45-val.txt` is not used.
"""

from __future__ import annotations

import os
from collections import Counter

from pipeline.eval.task_formats.base import (
    Example,
    SplitData,
    TaskFormatError,
    find_base,
    list_class_folders,
    list_folder_images,
    need_dir,
    read_lines,
    seeded_split,
)

SEEDED_TEST_FRACTION = 0.2
LAYOUT = """\
root/NWPU-RESISC45/<class>/<class>_NNN.jpg     (45 classes, e.g. airplane/airplane_001.jpg)
root/resisc45-train.txt, root/resisc45-test.txt (optional, torchgeo's split lists: one file name a line;
    without both, each class is split 80/20 by the seed)"""


def _list_file(base: str, split: str) -> str:
    """torchgeo keeps the lists next to NWPU-RESISC45/; inside it is accepted too."""
    name = f"resisc45-{split}.txt"
    beside = os.path.join(os.path.dirname(os.path.abspath(base)), name)
    inside = os.path.join(base, name)
    return inside if os.path.isfile(inside) and not os.path.isfile(beside) else beside


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    base = need_dir(find_base(root, "NWPU-RESISC45", "airplane"), "NWPU-RESISC45 class folders")
    classes = list_class_folders(base)
    if not classes:
        raise TaskFormatError(f"{base}: no class sub-folders")
    skipped = Counter()
    by_name: dict[str, Example] = {}
    for label, name in enumerate(classes):
        images, others = list_folder_images(os.path.join(base, name))
        skipped["not_image"] += others
        for path in images:
            by_name[os.path.basename(path)] = Example(input=path, label=label)
    lists = {split: _list_file(base, split) for split in ("train", "test")}
    present = [split for split, path in lists.items() if os.path.isfile(path)]
    if not present:
        by_class: dict[int, list[Example]] = {}
        for ex in by_name.values():
            by_class.setdefault(ex.label, []).append(ex)
        train, test = seeded_split(by_class, SEEDED_TEST_FRACTION, seed)
        return classes, SplitData(train, skipped), SplitData(test)
    if len(present) == 1:
        absent = lists["test" if present == ["train"] else "train"]
        raise TaskFormatError(f"{absent}: missing (both resisc45-train.txt and resisc45-test.txt, or neither)")
    splits = []
    for split, path in lists.items():
        examples = []
        for line_no, name in read_lines(path, f"RESISC45 {split} list"):
            if name not in by_name:
                raise TaskFormatError(f"{path}:{line_no}: {name} is not an image in any class folder of {base}")
            examples.append(by_name[name])
        splits.append(SplitData(examples, skipped if split == "train" else Counter()))
    return classes, splits[0], splits[1]
