"""The evaluation task registry: the paper's probe suites, each read from its official layout.

One task per kind of read-out (AB paper appendix A.1; Beyer et al. 2023): classification on
ImageNet-style folders, Food101, Pets, RESISC45, SUN397 and VTAB's CLEVR count/distance; object
classification in a box and detection on COCO and VISOR; single-frame verb/noun recognition on
EPIC-KITCHENS-100. Beside these probe suites (TASKS: classes, a train and a test split each),
CAPTION_TASKS holds the image-text sets only the retrieval readout reads (kind `captions`: images with
their captions, a test split only, no classes). `load_task` reads either and returns image paths and
targets only; decoding is the eval job's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION, TaskInfo
from pipeline.eval.task_formats import captions, clevr, coco, epic, folder, food101, pets, resisc45, sun397, visor
from pipeline.eval.task_formats.base import (
    Example,
    SplitData,
    TaskData,
    TaskFormatError,
    check_inputs_exist,
    subsample,
)

__all__ = ["CAPTION_TASKS", "TASKS", "Example", "TaskData", "TaskFormatError", "TaskSpec", "load_task"]

Loader = Callable[[str, int], tuple[list[str], SplitData, SplitData]]  # (root, seed) -> (classes, train, test)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # one of probe_data.TASK_KINDS, or captions.CAPTIONS
    description: str
    layout: str  # the expected on-disk layout under `root`, for the README and error messages
    splits: str  # which official splits become train / test
    loader: Loader
    needs_train: bool = True  # False: a readout that trains nothing (retrieval) reads the test split alone


def _spec(name, kind, description, layout, splits, loader, needs_train=True) -> tuple[str, TaskSpec]:
    return name, TaskSpec(name, kind, description, layout, splits, loader, needs_train)


TASKS: dict[str, TaskSpec] = dict(
    [
        _spec(
            "folder",
            CLASSIFICATION,
            "ImageNet-style class folders (e.g. ImageNet-1k)",
            folder.LAYOUT,
            "train/ -> train, val/ -> test; or a seeded 70/30 split per class",
            folder.load,
        ),
        _spec(
            "food101",
            CLASSIFICATION,
            "Food-101, 101 dishes",
            food101.LAYOUT,
            "meta/train.txt -> train, meta/test.txt -> test",
            food101.load,
        ),
        _spec(
            "pets",
            CLASSIFICATION,
            "Oxford-IIIT Pets, 37 breeds",
            pets.LAYOUT,
            "trainval.txt -> train, test.txt -> test",
            pets.load,
        ),
        _spec(
            "resisc45",
            CLASSIFICATION,
            "NWPU-RESISC45 remote-sensing scenes, 45 classes",
            resisc45.LAYOUT,
            "resisc45-train.txt -> train, resisc45-test.txt -> test; without them a seeded 80/20 split per class",
            resisc45.load,
        ),
        _spec(
            "sun397",
            CLASSIFICATION,
            "SUN397 scenes, 397 classes",
            sun397.LAYOUT,
            "Partitions/Training_01.txt -> train, Testing_01.txt -> test",
            sun397.load,
        ),
        _spec(
            "clevr_count",
            CLASSIFICATION,
            "CLEVR object count, 3..10 (VTAB count_all)",
            clevr.LAYOUT,
            "CLEVR train -> train, CLEVR val -> test",
            clevr.load_count,
        ),
        _spec(
            "clevr_distance",
            CLASSIFICATION,
            "CLEVR closest-object depth, 6 bins (VTAB closest_object_distance)",
            clevr.LAYOUT,
            "CLEVR train -> train, CLEVR val -> test",
            clevr.load_distance,
        ),
        _spec(
            "coco_objects",
            BOX_CLASSIFICATION,
            "COCO 2017: class of the object in a given box, 80 classes",
            coco.LAYOUT,
            "train2017 -> train, val2017 -> test",
            coco.load_objects,
        ),
        _spec(
            "coco_detection",
            DETECTION,
            "COCO 2017 detection, 80 classes",
            coco.LAYOUT,
            "train2017 -> train, val2017 -> test",
            coco.load_detection,
        ),
        _spec(
            "epic_verbs",
            CLASSIFICATION,
            "EPIC-KITCHENS-100 verb of an action from its middle frame, 97 classes",
            epic.LAYOUT,
            "EPIC_100_train.csv -> train, EPIC_100_validation.csv -> test",
            epic.load_verbs,
        ),
        _spec(
            "epic_nouns",
            CLASSIFICATION,
            "EPIC-KITCHENS-100 noun of an action from its middle frame, 300 classes",
            epic.LAYOUT,
            "EPIC_100_train.csv -> train, EPIC_100_validation.csv -> test",
            epic.load_nouns,
        ),
        _spec(
            "visor_objects",
            BOX_CLASSIFICATION,
            "VISOR: class of the object in a given box (EPIC nouns v2)",
            visor.LAYOUT,
            "VISOR train -> train, VISOR val -> test",
            visor.load_objects,
        ),
        _spec(
            "visor_detection",
            DETECTION,
            "VISOR detection (EPIC nouns v2)",
            visor.LAYOUT,
            "VISOR train -> train, VISOR val -> test",
            visor.load_detection,
        ),
    ]
)
CAPTION_TASKS: dict[str, TaskSpec] = dict(
    [
        _spec(
            "coco_captions",
            captions.CAPTIONS,
            "COCO 2017 captions: image-text retrieval (several captions per image)",
            captions.LAYOUT,
            "val2017 -> test (no train split)",
            captions.load,
            needs_train=False,
        ),
    ]
)


def _skip_counts(train: SplitData, test: SplitData) -> dict[str, int]:
    return {
        f"{split}/{reason}": n
        for split, data in (("train", train), ("test", test))
        for reason, n in sorted(data.skipped.items())
        if n
    }


def load_task(name: str, root: str, max_per_split: int | None = None, seed: int = 0) -> TaskData:
    """Read task `name` from `root` (see its TaskSpec.layout); `max_per_split` keeps a seeded subset.

    Raises KeyError for an unknown task and TaskFormatError, naming the file and the expected
    layout, when `root` does not hold the task's data in that layout.
    """
    spec = TASKS.get(name) or CAPTION_TASKS.get(name)
    if spec is None:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join([*TASKS, *CAPTION_TASKS])}")
    try:
        if not os.path.isdir(root):
            raise TaskFormatError(f"{root}: not a folder")
        class_names, train, test = spec.loader(root, seed)
        splits = {
            "train": subsample(train.examples, max_per_split, seed),
            "test": subsample(test.examples, max_per_split, seed + 1),
        }
        for split, examples in splits.items():
            if not examples and (split == "test" or spec.needs_train):
                raise TaskFormatError(f"{root}: the {split} split has no examples")
            check_inputs_exist(examples, split)
    except TaskFormatError as exc:
        raise TaskFormatError(f"task '{name}': {exc}\nexpected layout under {root}:\n{spec.layout}") from None
    info = TaskInfo(name=name, kind=spec.kind, class_names=list(class_names))
    return TaskData(info=info, train=splits["train"], test=splits["test"], skipped=_skip_counts(train, test))
