"""SUN397: `SUN397/<letter>/<class>[/<sub>]/sun_*.jpg`, `ClassName.txt`, `Partitions/{Training,Testing}_01.txt`.

Partition 01 of the ten official 50/50-per-class partitions (Xiao et al.); class names are the
ClassName.txt entries without the leading "/<letter>/" (e.g. "apartment_building/outdoor").
"""

from __future__ import annotations

import os

from pipeline.eval.task_formats.base import Example, SplitData, TaskFormatError, find_base, need_dir, read_lines

PARTITION = "01"
LAYOUT = """\
root/SUN397/<letter>/<class>[/<sub>]/sun_<id>.jpg   (e.g. SUN397/a/abbey/sun_aaalbzqrimafwbiv.jpg)
root/SUN397/ClassName.txt                           (one "/a/abbey" a line, 397 lines)
root/SUN397/Partitions/Training_01.txt, Testing_01.txt (from Partitions.zip; one "/a/abbey/sun_....jpg" a line)"""


def _class_key(entry: str) -> str:
    return "/" + entry.strip("/")


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    base = need_dir(find_base(root, "SUN397", "ClassName.txt"), "SUN397 image folders")
    names_file = os.path.join(base, "ClassName.txt")
    keys = [_class_key(entry) for _, entry in read_lines(names_file, "SUN397 class list")]
    if len(set(keys)) != len(keys):
        raise TaskFormatError(f"{names_file}: a class is listed twice")
    index = {key: i for i, key in enumerate(keys)}
    splits = []
    for split, stem in (("train", "Training"), ("test", "Testing")):
        path = os.path.join(base, "Partitions", f"{stem}_{PARTITION}.txt")
        examples = []
        for line_no, entry in read_lines(path, f"SUN397 {split} partition"):
            key = _class_key(os.path.dirname(entry))
            if key not in index:
                raise TaskFormatError(
                    f"{path}:{line_no}: class '{key}' of {entry} is not in {names_file} ({len(keys)} classes)"
                )
            examples.append(Example(input=os.path.join(base, entry.lstrip("/")), label=index[key]))
        splits.append(SplitData(examples))
    classes = [key.split("/", 2)[2] if key.count("/") >= 2 else key.strip("/") for key in keys]
    return classes, splits[0], splits[1]
