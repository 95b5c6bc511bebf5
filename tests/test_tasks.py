"""Task registry: every adapter on a tiny dataset in its official layout, and its bad-input errors.

Expected targets come from two independent places: the annotation files re-read here with plain
csv/json code and loops, and the pixels themselves (tests/task_fixtures.py paints each image or
box in its class colour).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION
from pipeline.eval.tasks import TASKS, TaskFormatError, load_task
from tests import task_fixtures as fx

CLASSIFICATION_TASKS = ["folder", "food101", "pets", "resisc45", "sun397", "epic_verbs", "epic_nouns"]
BOX_TASKS = ["coco_objects", "coco_detection", "visor_objects", "visor_detection"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One copy of each fixture dataset, built once; tests that break a dataset copy it first."""
    return {name: fx.FIXTURES[name](str(tmp_path_factory.mktemp(name))) for name in TASKS}


def nearest_class(pixels: np.ndarray) -> int:
    """The palette colour nearest to the mean colour of `pixels`."""
    mean = pixels.reshape(-1, 3).astype(float).mean(0)
    return int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in fx.PALETTE]))


def pixel_label(task: str, path: str) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    w = pixels.shape[1]
    if task == "epic_verbs":
        return nearest_class(pixels[:, 2 : w // 2 - 2])
    if task == "epic_nouns":
        return nearest_class(pixels[:, w // 2 + 2 : w - 2])
    return nearest_class(pixels)


def pairs(examples) -> list[tuple[str, int]]:
    return sorted((ex.input, ex.label) for ex in examples)


def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


# ------------------------------------------------------- expected splits, re-read from the files


def expected_folder(root):
    classes = sorted(os.listdir(os.path.join(root, "train")))
    out = []
    for split in ("train", "val"):
        out.append(
            sorted(
                (os.path.join(root, split, c, f), classes.index(c))
                for c in os.listdir(os.path.join(root, split))
                for f in os.listdir(os.path.join(root, split, c))
                if f.lower().endswith(".jpeg")
            )
        )
    return classes, *out


def expected_food101(root):
    base = os.path.join(root, "food-101")
    classes = read_list(os.path.join(base, "meta", "classes.txt"))
    return classes, *[
        sorted(
            (os.path.join(base, "images", e + ".jpg"), classes.index(e.split("/")[0]))
            for e in read_list(os.path.join(base, "meta", f"{s}.txt"))
        )
        for s in ("train", "test")
    ]


def expected_pets(root):
    base = os.path.join(root, "oxford-iiit-pet")
    splits = [
        [ln.split() for ln in read_list(os.path.join(base, "annotations", f"{s}.txt"))] for s in ("trainval", "test")
    ]
    return [b for b, _ in fx.PET_BREEDS], *[
        sorted((os.path.join(base, "images", r[0] + ".jpg"), int(r[1]) - 1) for r in rows) for rows in splits
    ]


def expected_resisc45(root):
    base = os.path.join(root, "NWPU-RESISC45")
    classes = sorted(os.listdir(base))
    return classes, *[
        sorted(
            (os.path.join(base, n.rsplit("_", 1)[0], n), classes.index(n.rsplit("_", 1)[0]))
            for n in read_list(os.path.join(root, f"resisc45-{s}.txt"))
        )
        for s in ("train", "test")
    ]


def expected_sun397(root):
    base = os.path.join(root, "SUN397")
    keys = read_list(os.path.join(base, "ClassName.txt"))
    return [k[3:] for k in keys], *[
        sorted(
            (base + e, keys.index(e.rsplit("/", 1)[0]))
            for e in read_list(os.path.join(base, "Partitions", f"{s}_01.txt"))
        )
        for s in ("Training", "Testing")
    ]


def expected_epic(root, column):
    def rows(name):
        with open(os.path.join(root, name)) as f:
            return list(csv.DictReader(f))

    names = [r["key"] for r in rows(f"EPIC_100_{column}_classes.csv")]
    out = []
    for split in ("train", "validation"):
        kept = []
        for r in rows(f"EPIC_100_{split}.csv"):
            folder = os.path.join(root, r["participant_id"], "rgb_frames", r["video_id"])
            if os.path.isdir(folder):
                middle = (int(r["start_frame"]) + int(r["stop_frame"])) // 2
                kept.append((os.path.join(folder, "frame_%010d.jpg" % middle), int(r[f"{column}_class"])))
        out.append(sorted(kept))
    return names, *out


EXPECTED = {
    "folder": expected_folder,
    "food101": expected_food101,
    "pets": expected_pets,
    "resisc45": expected_resisc45,
    "sun397": expected_sun397,
    "epic_verbs": lambda r: expected_epic(r, "verb"),
    "epic_nouns": lambda r: expected_epic(r, "noun"),
}


def test_registry_lists_every_task_with_its_kind_and_layout():
    kinds = {name: spec.kind for name, spec in TASKS.items()}
    assert kinds == {
        **{n: CLASSIFICATION for n in CLASSIFICATION_TASKS + ["clevr_count", "clevr_distance"]},
        "coco_objects": BOX_CLASSIFICATION,
        "visor_objects": BOX_CLASSIFICATION,
        "coco_detection": DETECTION,
        "visor_detection": DETECTION,
    }
    assert all(spec.layout and spec.splits and spec.description for spec in TASKS.values())
    with pytest.raises(KeyError, match="known tasks: folder, food101"):
        load_task("imagenet21k", "/nowhere")


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_classification_adapters_read_the_official_splits(task, datasets):
    root = datasets[task]
    data = load_task(task, root)
    classes, train, test = EXPECTED[task](root)
    assert data.info.kind == CLASSIFICATION and data.info.class_names == classes
    assert pairs(data.train) == train and pairs(data.test) == test
    assert not {p for p, _ in train} & {p for p, _ in test}
    for ex in data.train + data.test:  # the label is the colour the fixture painted
        assert pixel_label(task, ex.input) == ex.label, ex.input


@pytest.mark.parametrize(
    "task, top",
    [
        ("food101", "food-101"),
        ("pets", "oxford-iiit-pet"),
        ("resisc45", "NWPU-RESISC45"),
        ("sun397", "SUN397"),
        ("clevr_count", "CLEVR_v1.0"),
        ("visor_objects", "GroundTruth-SparseAnnotations"),
    ],
)
def test_root_may_be_the_archives_top_folder(task, top, datasets):
    outer = load_task(task, datasets[task])
    inner = load_task(task, os.path.join(datasets[task], top))
    assert [(e.input, e.label) for e in inner.train + inner.test] == [
        (e.input, e.label) for e in outer.train + outer.test
    ]


def test_folder_counts_stray_files_and_ignores_hidden_ones(datasets):
    assert load_task("folder", datasets["folder"]).skipped == {"train/not_image": 1}


def test_epic_counts_actions_of_videos_without_frames(datasets):
    data = load_task("epic_verbs", datasets["epic_verbs"])
    absent = sum(1 for a in fx._epic_actions() if a[2] == "P03_04")
    assert data.skipped == {"train/video_not_extracted": absent}


def test_seeded_splits_are_stratified_disjoint_and_reproducible(tmp_path):
    root = fx.make_flat_folder(str(tmp_path / "flat"))
    a, b, c = (load_task("folder", root, seed=s) for s in (0, 0, 1))
    assert pairs(a.train) == pairs(b.train) and pairs(a.test) == pairs(b.test)
    assert pairs(a.test) != pairs(c.test)
    everything = sorted(
        (os.path.join(root, d, f), i)
        for i, d in enumerate(["cat", "dog", "fish"])
        for f in os.listdir(os.path.join(root, d))
    )
    assert sorted(pairs(a.train) + pairs(a.test)) == everything
    for label in range(3):  # 5 a class, 30% -> 2 held out per class
        assert sum(ex.label == label for ex in a.test) == 2 and sum(ex.label == label for ex in a.train) == 3
    no_lists = fx.make_resisc45(str(tmp_path / "resisc"), split_lists=False)
    r = load_task("resisc45", no_lists, seed=3)
    assert [sum(ex.label == k for ex in r.test) for k in range(3)] == [1, 1, 1] and len(r.train) == 12


def test_max_per_split_takes_a_seeded_subset(datasets):
    full = load_task("food101", datasets["food101"])
    small = [load_task("food101", datasets["food101"], max_per_split=4, seed=s) for s in range(6)]
    assert all(len(d.train) == 4 and len(d.test) == 4 for d in small)
    assert set(pairs(small[0].train)) <= set(pairs(full.train)) and set(pairs(small[0].test)) <= set(pairs(full.test))
    assert pairs(small[0].train) == pairs(load_task("food101", datasets["food101"], max_per_split=4, seed=0).train)
    assert len({tuple(pairs(d.train)) for d in small}) > 1


def test_torchvision_reads_the_fixtures_as_we_do(datasets, tmp_path):
    """torchvision's own dataset classes are a second reader of the official layouts."""
    from torchvision.datasets import SUN397, CLEVRClassification, Food101, OxfordIIITPet

    def tv_pairs(ds):
        return sorted(
            (str(p), int(y)) for p, y in zip(ds._image_files if hasattr(ds, "_image_files") else ds._images, ds._labels)
        )

    food = load_task("food101", datasets["food101"])
    assert tv_pairs(Food101(datasets["food101"], split="train")) == pairs(food.train)
    assert tv_pairs(Food101(datasets["food101"], split="test")) == pairs(food.test)
    pets = load_task("pets", datasets["pets"])
    assert tv_pairs(OxfordIIITPet(datasets["pets"], split="trainval")) == pairs(pets.train)
    assert tv_pairs(OxfordIIITPet(datasets["pets"], split="test")) == pairs(pets.test)
    sun = load_task("sun397", datasets["sun397"])  # torchvision reads every image, not one partition
    assert set(pairs(sun.train) + pairs(sun.test)) <= set(tv_pairs(SUN397(datasets["sun397"])))
    clevr = fx.make_clevr(str(tmp_path / "clevr"))  # torchvision wants <root>/clevr/CLEVR_v1.0
    count = load_task("clevr_count", clevr)
    tv = CLEVRClassification(str(tmp_path), split="val")
    assert [(str(p), y - 3) for p, y in zip(tv._image_files, tv._labels)] == [(ex.input, ex.label) for ex in count.test]


# ------------------------------------------------------------------------------------------ CLEVR


def vtab_distance_bin(depth: float) -> int:
    """VTAB's rule written as a loop: the last threshold strictly below the depth."""
    thresholds = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    label = -1
    for i, t in enumerate(thresholds):
        if t < depth:
            label = i
    return label


def test_clevr_count_and_distance_follow_vtab(datasets):
    root = datasets["clevr_count"]
    count, distance = load_task("clevr_count", root), load_task("clevr_distance", root)
    assert count.info.class_names == [str(n) for n in range(3, 11)] and len(distance.info.class_names) == 6
    for split in ("train", "val"):
        with open(os.path.join(root, "CLEVR_v1.0", "scenes", f"CLEVR_{split}_scenes.json")) as f:
            scenes = json.load(f)["scenes"]
        images = [os.path.join(root, "CLEVR_v1.0", "images", split, s["image_filename"]) for s in scenes]
        got_count = count.train if split == "train" else count.test
        got_distance = distance.train if split == "train" else distance.test
        assert [ex.input for ex in got_count] == images
        assert [ex.label for ex in got_count] == [len(s["objects"]) - 3 for s in scenes]
        assert [ex.label for ex in got_distance] == [
            vtab_distance_bin(min(o["pixel_coords"][2] for o in s["objects"])) for s in scenes
        ]
    labels = [ex.label for ex in distance.train + distance.test]
    assert set(labels) == set(range(6)) and {ex.label for ex in count.train} == set(range(8))


# ------------------------------------------------------------------------------------- box tasks


def expected_coco(root, keep_empty):
    out = []
    for split in ("train2017", "val2017"):
        with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
            data = json.load(f)
        cat_ids = sorted(c["id"] for c in data["categories"])
        per_image = {}
        for im in data["images"]:
            boxes = []
            for a in data["annotations"]:
                x, y, w, h = a["bbox"]
                if a["image_id"] == im["id"] and not a["iscrowd"] and w > 0 and h > 0:
                    boxes.append(
                        (
                            [x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"]],
                            cat_ids.index(a["category_id"]),
                        )
                    )
            if boxes or keep_empty:
                per_image[os.path.join(root, split, im["file_name"])] = boxes
        out.append(per_image)
    return [c[1] for c in fx.COCO_CATEGORIES], *out


def expected_visor(root, keep_empty):
    base = os.path.join(root, "GroundTruth-SparseAnnotations")
    out = []
    for split in ("train", "val"):
        per_image = {}
        for name in sorted(os.listdir(os.path.join(base, "annotations", split))):
            with open(os.path.join(base, "annotations", split, name)) as f:
                entries = json.load(f)["video_annotations"]
            for e in entries:
                video = e["image"]["video"]
                path = os.path.join(base, "rgb_frames", split, video[:3], video, e["image"]["name"])
                if not os.path.isdir(os.path.dirname(path)):
                    continue
                boxes = []
                for a in e["annotations"]:
                    xs = [p[0] for poly in a["segments"] for p in poly]
                    ys = [p[1] for poly in a["segments"] for p in poly]
                    if xs:
                        boxes.append(([min(xs) / 1920, min(ys) / 1080, max(xs) / 1920, max(ys) / 1080], a["class_id"]))
                if boxes or keep_empty:
                    per_image[path] = boxes
        out.append(per_image)
    return list(fx.VISOR_CLASSES), *out


@pytest.mark.parametrize("task", BOX_TASKS)
def test_box_adapters_give_normalised_boxes_and_classes(task, datasets):
    root = datasets[task]
    data = load_task(task, root)
    keep_empty = task.endswith("detection")
    classes, train, test = (expected_coco if task.startswith("coco") else expected_visor)(root, keep_empty)
    assert data.info.class_names == classes and data.info.kind == TASKS[task].kind
    for got, want in ((data.train, train), (data.test, test)):
        assert sorted(ex.input for ex in got) == sorted(want)
        for ex in got:
            assert (
                ex.boxes.dtype == np.float32
                and ex.boxes.shape == (len(want[ex.input]), 4)
                and ex.box_labels.dtype == np.int64
            )
            np.testing.assert_allclose(
                ex.boxes, np.array([b for b, _ in want[ex.input]], np.float32).reshape(-1, 4), atol=1e-6
            )
            assert ex.box_labels.tolist() == [c for _, c in want[ex.input]]
            pixels = np.asarray(Image.open(ex.input).convert("RGB"))
            h, w = pixels.shape[:2]
            for (x0, y0, x1, y1), label in zip(ex.boxes, ex.box_labels):  # the box covers pixels of its class colour
                inner = pixels[int(y0 * h) + 2 : int(np.ceil(y1 * h)) - 2, int(x0 * w) + 2 : int(np.ceil(x1 * w)) - 2]
                assert nearest_class(inner) == label, (ex.input, label)
    if keep_empty:
        assert any(len(ex.boxes) == 0 for ex in data.train)


def test_box_adapters_count_what_they_leave_out(datasets):
    assert load_task("coco_objects", datasets["coco_objects"]).skipped == {
        f"{s}/{r}": 1 for s in ("train", "test") for r in ("crowd_box", "empty_box", "no_boxes")
    }
    assert load_task("coco_detection", datasets["coco_detection"]).skipped == {
        f"{s}/{r}": 1 for s in ("train", "test") for r in ("crowd_box", "empty_box")
    }
    visor = load_task("visor_objects", datasets["visor_objects"]).skipped
    assert visor == {
        "train/empty_segments": 2,
        "train/no_boxes": 1,
        "train/video_not_extracted": 3,
        "test/empty_segments": 1,
    }


# ------------------------------------------------------------------------------------ bad inputs


def _edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert old in text, (path, old)
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def _edit_json(path, change):
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _scene(data, n_objects=None, depth=None):
    objects = data["scenes"][0]["objects"]
    if n_objects:
        objects.extend([dict(objects[0]) for _ in range(n_objects - len(objects))])
    if depth:
        for o in objects:
            o["pixel_coords"] = [1, 1, depth]


# (task, what to break, the file the error must name, words it must contain)
BAD_INPUTS = [
    (
        "folder",
        lambda r: fx.class_image(f"{r}/val/n09999999/x.JPEG", 0),
        "val/n09999999",
        "not among the 3 train classes",
    ),
    ("folder", lambda r: shutil.rmtree(f"{r}/val"), "/val", "missing folder"),
    ("folder", lambda r: fx.class_image(f"{r}/val/ILSVRC2012_val_00000001.JPEG", 0), "/val", "directly in the folder"),
    (
        "food101",
        lambda r: _edit(f"{r}/food-101/meta/train.txt", "baklava/", "cheesecake/"),
        "meta/train.txt:7",
        "not in",
    ),
    ("food101", lambda r: os.remove(f"{r}/food-101/meta/classes.txt"), "meta/classes.txt", "missing"),
    ("food101", lambda r: os.remove(f"{r}/food-101/images/baklava/1076.jpg"), "baklava/1076.jpg", "missing"),
    (
        "pets",
        lambda r: _edit(f"{r}/oxford-iiit-pet/annotations/test.txt", "Abyssinian_4 1", "Abyssinian_4 2"),
        "test.txt:1",
        "is 'Abyssinian' here",
    ),
    (
        "pets",
        lambda r: _edit(f"{r}/oxford-iiit-pet/annotations/trainval.txt", " 1 1 1", " 1 1"),
        "trainval.txt:1",
        "is not",
    ),
    (
        "pets",
        lambda r: _edit(f"{r}/oxford-iiit-pet/annotations/test.txt", "Abyssinian_4 1", "Abyssinian_4 9"),
        "trainval.txt",
        "no trainval image",
    ),
    (
        "resisc45",
        lambda r: _edit(f"{r}/resisc45-train.txt", "airplane_001", "airplane_701"),
        "resisc45-train.txt:1",
        "not an image",
    ),
    ("resisc45", lambda r: os.remove(f"{r}/resisc45-test.txt"), "resisc45-test.txt", "both"),
    (
        "sun397",
        lambda r: _edit(f"{r}/SUN397/Partitions/Testing_01.txt", "/b/bedroom", "/b/bathroom"),
        "Testing_01.txt:5",
        "'/b/bathroom'",
    ),
    ("sun397", lambda r: _edit(f"{r}/SUN397/ClassName.txt", "/b/bedroom", "/a/abbey"), "ClassName.txt", "listed twice"),
    (
        "clevr_count",
        lambda r: _edit_json(f"{r}/CLEVR_v1.0/scenes/CLEVR_val_scenes.json", lambda d: _scene(d, n_objects=11)),
        "CLEVR_val_scenes.json",
        "class id 8 outside the 8 classes",
    ),
    (
        "clevr_distance",
        lambda r: _edit_json(f"{r}/CLEVR_v1.0/scenes/CLEVR_train_scenes.json", lambda d: _scene(d, depth=150.0)),
        "CLEVR_train_scenes.json",
        "class id 6 outside the 6 classes",
    ),
    (
        "clevr_count",
        lambda r: _edit(f"{r}/CLEVR_v1.0/scenes/CLEVR_train_scenes.json", '"scenes"', '"scenes'),
        "CLEVR_train_scenes.json",
        "not valid JSON",
    ),
    (
        "coco_objects",
        lambda r: _edit_json(
            f"{r}/annotations/instances_val2017.json", lambda d: d["annotations"][0].update(category_id=99)
        ),
        "instances_val2017.json",
        "category_id 99",
    ),
    (
        "coco_detection",
        lambda r: os.remove(f"{r}/annotations/instances_train2017.json"),
        "instances_train2017.json",
        "missing",
    ),
    (
        "coco_detection",
        lambda r: _edit_json(
            f"{r}/annotations/instances_train2017.json", lambda d: d.pop("images") and d.update(images={"x": 1})
        ),
        "instances_train2017.json",
        "not a COCO instances json",
    ),
    ("coco_objects", lambda r: os.remove(f"{r}/val2017/000000000724.jpg"), "val2017/000000000724.jpg", "missing"),
    (
        "epic_verbs",
        lambda r: _edit(f"{r}/EPIC_100_validation.csv", ",put,1,", ",put,7,"),
        "EPIC_100_validation.csv:",
        "verb_class: class id 7 outside the 4",
    ),
    (
        "epic_nouns",
        lambda r: _edit(f"{r}/EPIC_100_train.csv", "02.00,1,8,", "02.00,9,8,"),
        "EPIC_100_train.csv:2",
        "need 0 <= start_frame <= stop_frame",
    ),
    (
        "epic_nouns",
        lambda r: _edit(f"{r}/EPIC_100_train.csv", "noun_class", "noun_id"),
        "EPIC_100_train.csv",
        "missing column(s) ['noun_class']",
    ),
    ("epic_nouns", lambda r: os.remove(f"{r}/EPIC_100_noun_classes.csv"), "EPIC_100_noun_classes.csv", "missing"),
    (
        "epic_verbs",
        lambda r: shutil.rmtree(f"{r}/P02/rgb_frames/P02_01"),
        "EPIC_100_validation.csv",
        "none of its 4 actions",
    ),
    (
        "epic_verbs",
        lambda r: [os.remove(f"{r}/P01/rgb_frames/P01_01/{f}") for f in os.listdir(f"{r}/P01/rgb_frames/P01_01")],
        "P01/rgb_frames/P01_01/frame_",
        "missing",
    ),
    (
        "visor_objects",
        lambda r: _edit(
            f"{r}/GroundTruth-SparseAnnotations/annotations/val/P01_107.json", '"class_id": ', '"class_id": 1'
        ),
        "annotations/val/P01_107.json",
        "outside the 6 classes",
    ),
    (
        "visor_detection",
        lambda r: os.remove(f"{r}/EPIC_100_noun_classes_v2.csv"),
        "EPIC_100_noun_classes_v2.csv",
        "missing",
    ),
    (
        "visor_detection",
        lambda r: _edit(
            f"{r}/GroundTruth-SparseAnnotations/annotations/train/P01_01.json", "video_annotations", "frames"
        ),
        "annotations/train/P01_01.json",
        "no 'video_annotations' list",
    ),
]


@pytest.mark.parametrize(
    "task, damage, names, says",
    BAD_INPUTS,
    ids=[f"{t}-{n.split('/')[-1]}-{i}" for i, (t, _, n, _) in enumerate(BAD_INPUTS)],
)
def test_bad_datasets_raise_an_error_naming_the_file(task, damage, names, says, datasets, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(datasets[task], root)
    damage(root)
    with pytest.raises(TaskFormatError) as err:
        load_task(task, root)
    message = str(err.value)
    assert names in message and says in message, message
    assert f"expected layout under {root}" in message and TASKS[task].layout in message


@pytest.mark.parametrize(
    "task, other",
    [("food101", "pets"), ("coco_objects", "sun397"), ("epic_nouns", "visor_objects"), ("sun397", "folder")],
)
def test_a_dataset_in_another_tasks_layout_is_refused(task, other, datasets):
    with pytest.raises(TaskFormatError, match="missing") as err:
        load_task(task, datasets[other])
    assert datasets[other] in str(err.value)
    with pytest.raises(TaskFormatError, match="not a folder"):
        load_task(task, os.path.join(datasets[other], "no_such_dir"))
