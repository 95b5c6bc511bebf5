"""COCO captions 2017 for image-text retrieval: each val2017 image with its several captions.

Retrieval trains nothing, so only the test split is read: val2017 and `captions_val2017.json`
(COCO's own download, and what `abpipe scenes` writes under `<output>/scenes`). An image is one
`Example` whose `captions` are its captions in file order. What cannot be used is left out and
counted, never silently: an image the json lists but the disk lacks (`missing_image`), an image
without a caption (`no_captions`), a blank caption (`empty_caption`), a caption of an image the
json does not list (`caption_of_unlisted_image`). A json that is not in the captions format raises
`TaskFormatError` naming the file and the entry.
"""

from __future__ import annotations

import os
from collections import Counter

from pipeline.eval.task_formats.base import Example, SplitData, TaskFormatError, need_dir, read_json

CAPTIONS = "captions"  # the task kind: images with their captions (the `retrieval` readout reads it)
FOLDER = "val2017"
LAYOUT = """\
root/val2017/<12-digit id>.jpg
root/annotations/captions_val2017.json (COCO captions format: "images": [{"id", "file_name"}, ...],
  "annotations": [{"image_id", "caption"}, ...]; several captions per image)"""


def captions_json_path(root: str) -> str:
    return os.path.join(root, "annotations", f"captions_{FOLDER}.json")


def read_captions(path: str, images: str) -> SplitData:
    """The images of one COCO captions json (under folder `images`), each with its captions."""
    data = read_json(path, "COCO captions json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TaskFormatError(f'{path}: not a COCO captions json (expected an object with an "images" list)')
    if not isinstance(data.get("annotations"), list):
        raise TaskFormatError(f'{path}: not a COCO captions json (expected an object with an "annotations" list)')
    files: dict = {}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise TaskFormatError(f'{path}: images[{i}] needs an "id" and a "file_name" string, got {entry!r:.120}')
        if entry["id"] in files:
            raise TaskFormatError(f"{path}: images[{i}]: image id {entry['id']!r} listed twice")
        files[entry["id"]] = entry["file_name"]
    skipped: Counter = Counter()
    texts: dict = {image_id: [] for image_id in files}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise TaskFormatError(
                f'{path}: annotations[{i}] needs an "image_id" and a "caption" string, got {ann!r:.120}'
            )
        if ann["image_id"] not in texts:
            skipped["caption_of_unlisted_image"] += 1
        elif not ann["caption"].strip():
            skipped["empty_caption"] += 1
        else:
            texts[ann["image_id"]].append(ann["caption"].strip())
    examples = []
    for image_id in files:  # the json's order
        file = os.path.join(images, files[image_id])
        if not texts[image_id]:
            skipped["no_captions"] += 1
        elif not os.path.isfile(file):
            skipped["missing_image"] += 1
        else:
            examples.append(Example(input=file, captions=texts[image_id]))
    return SplitData(examples, skipped)


def load(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    """(no class names, an empty train split, the val2017 images with their captions)."""
    images = need_dir(os.path.join(root, FOLDER), f"COCO {FOLDER} images")
    return [], SplitData([]), read_captions(captions_json_path(root), images)
