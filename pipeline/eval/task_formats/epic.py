"""EPIC-KITCHENS-100 action recognition from one frame: the verb / noun class of each action.

An action's image is its middle frame, `(start_frame + stop_frame) // 2`, read from the official
extracted frames `<root>/PXX/rgb_frames/PXX_YY/frame_%010d.jpg`; the CSV's frame numbers are used
as the file numbers as they are (the published frames start at frame_0000000001). EPIC_100_train.csv
is the train split, EPIC_100_validation.csv the test split (test labels are not public). Actions
of a video whose frames are not extracted here are left out and counted (`video_not_extracted`),
since whole-dataset downloads are rare; a missing frame inside an extracted video is an error.
"""

from __future__ import annotations

import csv
import os
from collections import Counter

from pipeline.eval.task_formats.base import Example, SplitData, TaskFormatError, check_label, need_file

ANNOTATIONS_DIR = "epic-kitchens-100-annotations"  # the annotation repo's folder name, if cloned into root
CSVS = {"train": "EPIC_100_train.csv", "test": "EPIC_100_validation.csv"}
CLASS_CSVS = {"verb": "EPIC_100_verb_classes.csv", "noun": "EPIC_100_noun_classes.csv"}
ACTION_COLUMNS = ("narration_id", "participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class")
LAYOUT = """\
root/EPIC_100_train.csv, EPIC_100_validation.csv, EPIC_100_verb_classes.csv, EPIC_100_noun_classes.csv
    (from github.com/epic-kitchens/epic-kitchens-100-annotations; may also sit in root/epic-kitchens-100-annotations/)
root/PXX/rgb_frames/PXX_YY/frame_0000000001.jpg  (each PXX/rgb_frames/PXX_YY.tar extracted into a folder of its name)"""


def frame_path(root: str, participant: str, video: str, frame: int) -> str:
    return os.path.join(root, participant, "rgb_frames", video, f"frame_{frame:010d}.jpg")


def middle_frame(start: int, stop: int) -> int:
    return max(1, (start + stop) // 2)  # the first extracted frame is frame_0000000001


def _annotation_file(root: str, name: str) -> str:
    for folder in (root, os.path.join(root, ANNOTATIONS_DIR)):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return need_file(os.path.join(root, name), f"EPIC-KITCHENS-100 annotation csv (or in {ANNOTATIONS_DIR}/)")


def _read_csv(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise TaskFormatError(f"{path}: missing column(s) {absent} (header: {reader.fieldnames})")
        return list(reader)


def read_class_csv(path: str) -> list[str]:
    """Class keys of an EPIC class csv (`id,key,...`), indexed by id; ids must run 0..N-1."""
    rows = _read_csv(path, ("id", "key"))
    try:
        ids = [int(row["id"]) for row in rows]
    except ValueError as exc:
        raise TaskFormatError(f"{path}: a non-integer class id ({exc})") from None
    if sorted(ids) != list(range(len(ids))):
        raise TaskFormatError(f"{path}: class ids are not 0..{len(ids) - 1}")
    names = {int(row["id"]): row["key"] for row in rows}
    return [names[i] for i in range(len(ids))]


def _class_names(root: str, kind: str) -> list[str]:
    return read_class_csv(_annotation_file(root, CLASS_CSVS[kind]))


def _read_split(root: str, path: str, column: str, num_classes: int) -> SplitData:
    examples, skipped, extracted = [], Counter(), {}
    for line_no, row in enumerate(_read_csv(path, ACTION_COLUMNS), 2):
        where = f"{path}:{line_no} ({row['narration_id']})"
        try:
            start, stop, label = int(row["start_frame"]), int(row["stop_frame"]), int(row[column])
        except ValueError:
            raise TaskFormatError(f"{where}: start_frame / stop_frame / {column} are not integers") from None
        if not 0 <= start <= stop:
            raise TaskFormatError(
                f"{where}: start_frame {start} / stop_frame {stop} (need 0 <= start_frame <= stop_frame)"
            )
        check_label(label, num_classes, f"{where} {column}")
        participant, video = row["participant_id"], row["video_id"]
        video_dir = os.path.join(root, participant, "rgb_frames", video)
        if video not in extracted:
            extracted[video] = os.path.isdir(video_dir)
        if not extracted[video]:
            skipped["video_not_extracted"] += 1
            continue
        examples.append(Example(input=frame_path(root, participant, video, middle_frame(start, stop)), label=label))
    return SplitData(examples, skipped)


def _load(root: str, kind: str):
    classes = _class_names(root, kind)
    column = f"{kind}_class"
    splits = [_read_split(root, _annotation_file(root, CSVS[s]), column, len(classes)) for s in ("train", "test")]
    for split, data in zip(("train", "test"), splits):
        if not data.examples:
            tars = os.path.join(root, "PXX", "rgb_frames", "PXX_YY.tar")
            raise TaskFormatError(
                f"{_annotation_file(root, CSVS[split])}: none of its {data.skipped['video_not_extracted']} actions has "
                "an "
                f"extracted frame folder under {root} (extract {tars} into {tars[:-4]}/)"
            )
    return classes, splits[0], splits[1]


def load_verbs(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, "verb")


def load_nouns(root: str, seed: int) -> tuple[list[str], SplitData, SplitData]:
    return _load(root, "noun")
