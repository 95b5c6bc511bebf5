"""Food-101: `food-101/images/<class>/<id>.jpg`, `meta/classes.txt`, `meta/{train,test}.txt`.

The split lists name images as `<class>/<id>` (no suffix); the official 750/250 per class split.
"""

from __future__ import annotations

import os

from pipeline.eval.task_formats.base import Example, SplitData, TaskFormatError, find_base, need_dir, read_lines

LAYOUT = """\
root/food-101/images/<class>/<id>.jpg   (e.g. images/apple_pie/1005649.jpg)
root/food-101/meta/classes.txt          (one class a line: apple_pie, ...)
root/food-101/meta/train.txt, meta/test.txt  (one <class>/<id> a line)"""


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    base = find_base(root, "food-101", "meta")
    meta = need_dir(os.path.join(base, "meta"), "Food-101 meta/ folder")
    images = need_dir(os.path.join(base, "images"), "Food-101 images/ folder")
    classes_file = os.path.join(meta, "classes.txt")
    classes = [name for _, name in read_lines(classes_file, "Food-101 class list")]
    if len(set(classes)) != len(classes):
        raise TaskFormatError(f"{classes_file}: a class is listed twice")
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for split in ("train", "test"):
        path = os.path.join(meta, f"{split}.txt")
        examples = []
        for line_no, entry in read_lines(path, f"Food-101 {split} list"):
            cls, sep, image_id = entry.partition("/")
            if not sep or not image_id:
                raise TaskFormatError(f"{path}:{line_no}: '{entry}' is not <class>/<id>")
            if cls not in index:
                raise TaskFormatError(
                    f"{path}:{line_no}: class '{cls}' is not in {classes_file} ({len(classes)} classes)"
                )
            examples.append(Example(input=os.path.join(images, cls, f"{image_id}.jpg"), label=index[cls]))
        splits.append(SplitData(examples))
    return classes, splits[0], splits[1]
