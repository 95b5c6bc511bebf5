"""Tiny datasets in each evaluation task's official on-disk layout, with real JPEG/PNG images.

`make_<task>(root) -> root` writes one dataset under `root` (the folder a user would pass as
`load_task(..., root=...)`). The pixels encode the targets so a test can check a loader's labels
against the images themselves and a probe has something learnable: a classification image is
filled with its class's PALETTE colour (EPIC frames: verb colour left half, noun colour right
half); a box task's image has each box filled with its class's colour. Sizes are deliberately
small; the layouts, file names and annotation fields are the real ones.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from PIL import Image

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
]
BACKGROUND = (20, 20, 20)


def _write(path: str, pixels: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(pixels.astype(np.uint8))
    if path.lower().endswith(".png"):
        image.save(path)
    else:
        image.save(path, format="JPEG", quality=95)
    return path


def class_image(path: str, label: int, size=(40, 32)) -> str:
    """A (width, height) image filled with the class colour."""
    w, h = size
    return _write(path, np.broadcast_to(np.array(PALETTE[label], np.uint8), (h, w, 3)).copy())


def boxes_image(path: str, boxes01, labels, size=(64, 48)) -> str:
    """A dark image with each [0, 1] xyxy box filled with its class colour."""
    w, h = size
    pixels = np.full((h, w, 3), BACKGROUND, np.uint8)
    for (x0, y0, x1, y1), label in zip(boxes01, labels):
        pixels[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = PALETTE[label]
    return _write(path, pixels)


def _lines(path: str, lines) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{ln}\n" for ln in lines))


def _json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def _csv(path: str, header: list[str], rows: list[list]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ------------------------------------------------------------------------------- classification

FOLDER_CLASSES = ["n01440764", "n01443537", "n01484850"]


def make_folder(root: str) -> str:
    """ImageNet-style: train/<wnid>/<wnid>_<n>.JPEG (4 a class), val/<wnid>/ (2 a class), one stray text file."""
    for label, wnid in enumerate(FOLDER_CLASSES):
        for i in range(4):
            class_image(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), label)
        for i in range(2):
            class_image(os.path.join(root, "val", wnid, f"ILSVRC2012_val_{label * 10 + i:08d}.JPEG"), label)
    _lines(os.path.join(root, "train", FOLDER_CLASSES[0], "notes.txt"), ["not an image"])
    _lines(os.path.join(root, "train", FOLDER_CLASSES[0], ".DS_Store"), ["hidden"])
    return root


def make_flat_folder(root: str) -> str:
    """root/<class>/*.jpg with no train/val: 5 images a class, split by the seed."""
    for label, name in enumerate(["cat", "dog", "fish"]):
        for i in range(5):
            class_image(os.path.join(root, name, f"{name}_{i}.jpg"), label)
    return root


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]


def make_food101(root: str) -> str:
    """food-101/images/<class>/<id>.jpg + meta/{classes,labels,train,test}.txt + meta/{train,test}.json:
    3 train + 2 test a class."""
    base = os.path.join(root, "food-101")
    train, test = [], []
    for label, cls in enumerate(FOOD_CLASSES):
        for i in range(5):
            image_id = str(1000 + 37 * label + i)
            class_image(os.path.join(base, "images", cls, f"{image_id}.jpg"), label)
            (train if i < 3 else test).append(f"{cls}/{image_id}")
    _lines(os.path.join(base, "meta", "classes.txt"), FOOD_CLASSES)
    _lines(os.path.join(base, "meta", "labels.txt"), [c.replace("_", " ").capitalize() for c in FOOD_CLASSES])
    _lines(os.path.join(base, "meta", "train.txt"), train)
    _lines(os.path.join(base, "meta", "test.txt"), test)
    for split, entries in (("train", train), ("test", test)):  # the archive also has the lists as json
        _json(
            os.path.join(base, "meta", f"{split}.json"),
            {c: [e for e in entries if e.startswith(c + "/")] for c in FOOD_CLASSES},
        )
    return root


# (breed, species 1 cat / 2 dog)
PET_BREEDS = [
    ("Abyssinian", 1),
    ("american_bulldog", 2),
    ("american_pit_bull_terrier", 2),
]


def make_pets(root: str) -> str:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg + annotations/{trainval,test}.txt: 3 trainval + 2 test a breed."""
    base = os.path.join(root, "oxford-iiit-pet")
    trainval, test = [], []
    breed_ids = {1: 0, 2: 0}
    for label, (breed, species) in enumerate(PET_BREEDS):
        breed_ids[species] += 1
        for n in range(1, 6):
            class_image(os.path.join(base, "images", f"{breed}_{n}.jpg"), label)
            (trainval if n <= 3 else test).append(f"{breed}_{n} {label + 1} {species} {breed_ids[species]}")
    _lines(os.path.join(base, "annotations", "trainval.txt"), trainval)
    _lines(os.path.join(base, "annotations", "test.txt"), test)
    return root


RESISC_CLASSES = ["airplane", "airport", "beach"]


def make_resisc45(root: str, split_lists: bool = True) -> str:
    """NWPU-RESISC45/<class>/<class>_NNN.jpg (5 a class) + torchgeo's resisc45-{train,val,test}.txt (3/1/1)."""
    lists = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(RESISC_CLASSES):
        for n in range(1, 6):
            name = f"{cls}_{n:03d}.jpg"
            class_image(os.path.join(root, "NWPU-RESISC45", cls, name), label, size=(32, 32))
            lists["train" if n <= 3 else "val" if n == 4 else "test"].append(name)
    if split_lists:
        for split, names in lists.items():
            _lines(os.path.join(root, f"resisc45-{split}.txt"), names)
    return root


SUN_CLASSES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]


def make_sun397(root: str) -> str:
    """SUN397/<letter>/<class>[/<sub>]/sun_*.jpg + ClassName.txt + Partitions/{Training,Testing}_01.txt.

    Each class has 2 training, 2 testing and 1 image in no partition (as in the real dataset).
    """
    base = os.path.join(root, "SUN397")
    train, test = [], []
    for label, key in enumerate(SUN_CLASSES):
        for i in range(5):
            rel = f"{key}/sun_{chr(97 + label)}{'abcde'[i]}qrimafwbiv.jpg"
            class_image(os.path.join(base, rel.lstrip("/")), label)
            if i < 2:
                train.append(rel)
            elif i < 4:
                test.append(rel)
    _lines(os.path.join(base, "ClassName.txt"), SUN_CLASSES)
    _lines(os.path.join(base, "Partitions", "ClassName.txt"), SUN_CLASSES)
    _lines(os.path.join(base, "Partitions", "Training_01.txt"), train)
    _lines(os.path.join(base, "Partitions", "Testing_01.txt"), test)
    return root


CLEVR_SIZE = (96, 64)  # real CLEVR images are 480x320; pixel_coords here are in this frame


def make_clevr(root: str) -> str:
    """CLEVR_v1.0/images/{train,val}/CLEVR_<split>_NNNNNN.png + scenes/CLEVR_<split>_scenes.json.

    12 train and 6 val scenes with 3..10 objects, closest depths spread over all of VTAB's bins.
    """
    rng = np.random.default_rng(7)
    base = os.path.join(root, "CLEVR_v1.0")
    closest = [7.2, 8.0, 8.3, 8.9, 9.2, 9.7, 10.4, 12.0, 8.6, 9.5, 7.9, 11.1, 8.2, 9.1, 9.9, 10.0, 13.5, 8.7]
    counts = [3, 4, 5, 6, 7, 8, 9, 10, 3, 10, 6, 4, 5, 7, 9, 3, 8, 10]
    k = 0
    for split, n in (("train", 12), ("val", 6)):
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            depths = [closest[k]] + list(closest[k] + rng.uniform(0.1, 4.0, counts[k] - 1))
            rng.shuffle(depths)
            w, h = CLEVR_SIZE
            objects, pixels = [], np.full((h, w, 3), (128, 128, 128), np.uint8)
            for j, depth in enumerate(depths):
                x, y = int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4))
                pixels[y - 3 : y + 3, x - 3 : x + 3] = PALETTE[j % len(PALETTE)]
                objects.append(
                    {
                        "color": "red",
                        "size": "large",
                        "shape": "cube",
                        "material": "rubber",
                        "rotation": 12.5,
                        "3d_coords": [float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)), 0.7],
                        "pixel_coords": [x, y, round(float(depth), 4)],
                    }
                )
            _write(os.path.join(base, "images", split, name), pixels)
            scenes.append(
                {
                    "image_index": i,
                    "image_filename": name,
                    "split": split,
                    "objects": objects,
                    "relationships": {},
                    "directions": {},
                }
            )
            k += 1
        _json(
            os.path.join(base, "scenes", f"CLEVR_{split}_scenes.json"),
            {"info": {"split": split, "version": "1.0"}, "scenes": scenes},
        )
    return root


make_clevr_count = make_clevr
make_clevr_distance = make_clevr

# ---------------------------------------------------------------------------------------- boxes

COCO_CATEGORIES = [(1, "person", "person"), (3, "car", "vehicle"), (18, "dog", "animal")]  # COCO's ids have gaps


def _grid_box(cell: int, cols: int = 3, rows: int = 2) -> list[float]:
    """A [0, 1] box inside grid cell `cell`, so boxes of one image never overlap."""
    cx, cy = cell % cols, cell // cols
    return [(cx + 0.2) / cols, (cy + 0.25) / rows, (cx + 0.8) / cols, (cy + 0.75) / rows]


def make_coco(root: str) -> str:
    """train2017/, val2017/, annotations/instances_{train,val}2017.json (COCO instances format).

    Image sizes differ, one crowd annotation (RLE), one zero-area box and one image without
    annotations per split.
    """
    index = {cid: i for i, (cid, _, _) in enumerate(COCO_CATEGORIES)}
    ann_id = 1
    for split, n_images, first_id in (("train2017", 5, 139), ("val2017", 3, 724)):
        images, annotations = [], []
        for k in range(n_images):
            image_id = first_id + 1000 * k
            width, height = (64 + 8 * k, 48 + 4 * (k % 2))
            file_name = f"{image_id:012d}.jpg"
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": width,
                    "height": height,
                    "license": 1,
                    "coco_url": "",
                    "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": "",
                }
            )
            boxes, labels = [], []
            if k < n_images - 1:  # the last image has no annotations
                for cell in range(1 + k % 3):
                    cat_id = COCO_CATEGORIES[(k + cell) % len(COCO_CATEGORIES)][0]
                    x0, y0, x1, y1 = _grid_box(cell)
                    bbox = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
                    annotations.append(
                        {
                            "id": ann_id,
                            "image_id": image_id,
                            "category_id": cat_id,
                            "bbox": bbox,
                            "area": bbox[2] * bbox[3],
                            "iscrowd": 0,
                            "segmentation": [
                                [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
                            ],
                        }
                    )
                    ann_id += 1
                    boxes.append([x0, y0, x1, y1])
                    labels.append(index[cat_id])
            if k == 0:
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [0.0, 0.0, width / 2, height / 2],
                        "area": 100.0,
                        "iscrowd": 1,
                        "segmentation": {"counts": [0, 12, 30], "size": [height, width]},
                    }
                )
                annotations.append(
                    {
                        "id": ann_id + 1,
                        "image_id": image_id,
                        "category_id": 3,
                        "bbox": [5.0, 5.0, 0.0, 4.0],
                        "area": 0.0,
                        "iscrowd": 0,
                        "segmentation": [[5, 5, 5, 9, 5, 5]],
                    }
                )
                ann_id += 2
            boxes_image(os.path.join(root, split, file_name), boxes, labels, size=(width, height))
        categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES]
        _json(
            os.path.join(root, "annotations", f"instances_{split}.json"),
            {
                "info": {"year": 2017},
                "licenses": [{"id": 1, "name": "CC"}],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
        )
    return root


make_coco_objects = make_coco
make_coco_detection = make_coco

EPIC_VERBS = ["take", "put", "wash", "open"]
EPIC_NOUNS = ["tap", "spoon", "plate", "cupboard", "knife"]
EPIC_COLUMNS = [
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]
EPIC_FRAME_SIZE = (48, 27)  # real rgb_frames are 456x256


def epic_frame(path: str, verb: int, noun: int) -> str:
    """An EPIC frame: verb colour on the left half, noun colour on the right."""
    w, h = EPIC_FRAME_SIZE
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:, : w // 2], pixels[:, w // 2 :] = PALETTE[verb], PALETTE[noun]
    return _write(path, pixels)


def _epic_actions():
    """(split, participant, video, start, stop, verb, noun) of every action in the fixture."""
    actions, rng = [], np.random.default_rng(3)
    for split, videos in (("train", ["P01_01", "P01_02"]), ("validation", ["P02_01"])):
        for video in videos:
            start = 1
            for _ in range(4):
                length = int(rng.integers(2, 9))
                actions.append(
                    (split, video[:3], video, start, start + length, int(rng.integers(4)), int(rng.integers(5)))
                )
                start += length + int(rng.integers(1, 4))
    actions.append(("train", "P03", "P03_04", 10, 20, 0, 0))  # its frames are not extracted
    return actions


def make_epic(root: str) -> str:
    """EPIC_100_{train,validation}.csv + EPIC_100_{verb,noun}_classes.csv + PXX/rgb_frames/PXX_YY/frame_%010d.jpg.

    Every frame of each action is written (as extraction would), coloured by that action's verb
    and noun; gaps between actions get background frames. Video P03_04 is annotated but not
    extracted (its actions are counted as `video_not_extracted`).
    """
    rows = {"train": [], "validation": []}
    for n, (split, participant, video, start, stop, verb, noun) in enumerate(_epic_actions()):
        rows[split].append(
            [
                f"{video}_{n}",
                participant,
                video,
                "00:00:01.00",
                "00:00:01.00",
                "00:00:02.00",
                start,
                stop,
                f"{EPIC_VERBS[verb]} {EPIC_NOUNS[noun]}",
                EPIC_VERBS[verb],
                verb,
                EPIC_NOUNS[noun],
                noun,
                f"['{EPIC_NOUNS[noun]}']",
                f"[{noun}]",
            ]
        )
        if video != "P03_04":
            for frame in range(start, stop + 1):
                epic_frame(os.path.join(root, participant, "rgb_frames", video, f"frame_{frame:010d}.jpg"), verb, noun)
    for split, split_rows in rows.items():
        _csv(os.path.join(root, f"EPIC_100_{split}.csv"), EPIC_COLUMNS, split_rows)
    _csv(
        os.path.join(root, "EPIC_100_verb_classes.csv"),
        ["id", "key", "instances", "category"],
        [[i, v, f"['{v}']", "manipulation"] for i, v in enumerate(EPIC_VERBS)],
    )
    _csv(
        os.path.join(root, "EPIC_100_noun_classes.csv"),
        ["id", "key", "instances", "category"],
        [[i, v, f"['{v}']", "utensils"] for i, v in enumerate(EPIC_NOUNS)],
    )
    return root


make_epic_verbs = make_epic
make_epic_nouns = make_epic

VISOR_CLASSES = ["tap", "spoon", "plate", "cupboard", "left hand", "right hand"]
VISOR_FRAME_SIZE = (192, 108)  # the sparse frames are 1920x1080; here at 1/10


def make_visor(root: str) -> str:
    """GroundTruth-SparseAnnotations/{annotations,rgb_frames}/{train,val}/ + EPIC_100_noun_classes_v2.csv.

    Polygons are in VISOR's 1920x1080 frame (two polygons for some objects); frames are stored
    at 192x108. Includes an object with no polygon points, a frame whose only object has none,
    and an annotated video whose frame zip is not extracted (P02_03).
    """
    base = os.path.join(root, "GroundTruth-SparseAnnotations")
    rng = np.random.default_rng(5)
    videos = {"train": ["P01_01", "P02_03"], "val": ["P01_107"]}
    mask_id = 0
    for split, names in videos.items():
        for video in names:
            entries = []
            for f in range(3):
                frame = 140 + 37 * f
                name = f"{video}_frame_{frame:010d}.jpg"
                annotations, boxes, labels = [], [], []
                for cell in range(1 + f % 3):
                    label = int(rng.integers(len(VISOR_CLASSES)))
                    x0, y0, x1, y1 = (v * s for v, s in zip(_grid_box(cell), (1920, 1080, 1920, 1080)))
                    top = [[x0, y0], [x1, y0], [x1, (y0 + y1) / 2]]  # two polygons whose union spans the box
                    bottom = [[x0, (y0 + y1) / 2], [(x0 + x1) / 2, y1], [x0, y1]]
                    mask_id += 1
                    annotations.append(
                        {
                            "id": f"{video}_{mask_id}",
                            "name": VISOR_CLASSES[label],
                            "class_id": label,
                            "exhaustive": "y",
                            "segments": [top, bottom],
                        }
                    )
                    boxes.append(_grid_box(cell))
                    labels.append(label)
                if f == 1:
                    annotations.append(
                        {"id": f"{video}_empty", "name": "spoon", "class_id": 1, "exhaustive": "n", "segments": [[]]}
                    )
                if f == 2 and split == "train":  # a frame whose only object has no polygon
                    annotations, boxes, labels = (
                        [{"id": f"{video}_e2", "name": "plate", "class_id": 2, "exhaustive": "y", "segments": []}],
                        [],
                        [],
                    )
                entries.append(
                    {
                        "image": {
                            "image_path": f"{video}/{name}",
                            "name": name,
                            "subsequence": f"{video}_seq_00001",
                            "video": video,
                        },
                        "annotations": annotations,
                    }
                )
                if video != "P02_03":
                    boxes_image(
                        os.path.join(base, "rgb_frames", split, video[:3], video, name),
                        boxes,
                        labels,
                        size=VISOR_FRAME_SIZE,
                    )
            _json(os.path.join(base, "annotations", split, f"{video}.json"), {"video_annotations": entries})
    _csv(
        os.path.join(root, "EPIC_100_noun_classes_v2.csv"),
        ["id", "key", "instances", "category"],
        [[i, k, f"['{k}']", "x"] for i, k in enumerate(VISOR_CLASSES)],
    )
    return root


make_visor_objects = make_visor
make_visor_detection = make_visor

FIXTURES = {
    "folder": make_folder,
    "food101": make_food101,
    "pets": make_pets,
    "resisc45": make_resisc45,
    "sun397": make_sun397,
    "clevr_count": make_clevr,
    "clevr_distance": make_clevr,
    "coco_objects": make_coco,
    "coco_detection": make_coco,
    "epic_verbs": make_epic,
    "epic_nouns": make_epic,
    "visor_objects": make_visor,
    "visor_detection": make_visor,
}
