"""Oxford-IIIT Pets: `images/<Breed>_<n>.jpg` + `annotations/{trainval,test}.txt`.

Each list line is `<image id> <class id 1..37> <species 1|2> <breed id>`; the class name is the
image id without its trailing number, and one class id must always name the same breed.
"""

from __future__ import annotations

import os

from pipeline.eval.task_formats.base import Example, SplitData, TaskFormatError, find_base, need_dir, read_lines

LAYOUT = """\
root/oxford-iiit-pet/images/<Breed>_<n>.jpg     (e.g. images/Abyssinian_100.jpg)
root/oxford-iiit-pet/annotations/trainval.txt, annotations/test.txt
    (one "<image id> <class id 1..37> <species> <breed id>" a line, e.g. "Abyssinian_100 1 1 1")"""


def _read_list(path: str, images: str) -> list[tuple[str, int, str, int]]:
    """(image path, 0-based class id, breed name, line number) per line."""
    rows = []
    for line_no, line in read_lines(path, "Oxford-IIIT Pets split list"):
        parts = line.split()
        if len(parts) != 4 or not parts[1].isdigit() or "_" not in parts[0]:
            raise TaskFormatError(f"{path}:{line_no}: '{line}' is not '<Breed>_<n> <class id> <species> <breed id>'")
        image_id = parts[0]
        rows.append((os.path.join(images, f"{image_id}.jpg"), int(parts[1]) - 1, image_id.rsplit("_", 1)[0], line_no))
    return rows


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    base = find_base(root, "oxford-iiit-pet", "annotations")
    images = need_dir(os.path.join(base, "images"), "Oxford-IIIT Pets images/ folder")
    annotations = need_dir(os.path.join(base, "annotations"), "Oxford-IIIT Pets annotations/ folder")
    paths = {split: os.path.join(annotations, f"{split}.txt") for split in ("trainval", "test")}
    rows = {split: _read_list(path, images) for split, path in paths.items()}
    names: dict[int, str] = {}
    for split in ("trainval", "test"):
        for _, label, breed, line_no in rows[split]:
            if label < 0:
                raise TaskFormatError(f"{paths[split]}:{line_no}: class id {label + 1} (ids start at 1)")
            if names.setdefault(label, breed) != breed:
                raise TaskFormatError(
                    f"{paths[split]}:{line_no}: class id {label + 1} is '{breed}' here but '{names[label]}' elsewhere"
                )
    trained = {label for _, label, _, _ in rows["trainval"]}
    absent = sorted(set(range(max(names) + 1)) - trained)
    if absent:
        raise TaskFormatError(
            f"{paths['trainval']}: class id(s) {[a + 1 for a in absent]} have no trainval image (class ids must run "
            f"1..{max(names) + 1})"
        )
    classes = [names[i] for i in range(len(names))]
    splits = [SplitData([Example(input=p, label=label) for p, label, _, _ in rows[s]]) for s in ("trainval", "test")]
    return classes, splits[0], splits[1]
