"""Scenes: a small COCO-style dataset composed from real object images (the study's benchmark).

The AB paper's claim is strongest on scene data (COCO, EPIC-KITCHENS), where crop invariance is a
bad fit: two crops of a scene often hold different objects. No natural-photo scene set ships inside
a package, so this module composes one, deterministically from a seed, out of real object images
that do ship:

- objects: Fashion-MNIST (70,000 real 28x28 product photos, 10 classes, official train/test split;
  Debian package `dataset-fashion-mnist`), or scikit-learn's handwritten digits (1,797 8x8 scans,
  always installed: what tests and CI use), or Animal-MNIST (10,000 silhouettes, PyPI
  `animal-mnist`). Each object image is used by one split only, so train and test scenes share no
  object image.
- backgrounds: scikit-image's textures and photographs (brick, grass, gravel, coffee, ...), a random
  window of one per scene, tinted and dimmed so objects stand out without being trivially separable.
- a scene: a `canvas`-pixel square holding 1..`max_objects` objects at random positions and sizes,
  each tinted a random colour (colour carries no class information), overlapping little. Its boxes
  are the tight boxes of the pasted objects' masks.

Written in the COCO 2017 layout, so it goes through the real `abpipe ingest coco` path and the eval
job's `coco_objects` (box-conditioned classification) and `coco_detection` tasks unchanged:

    <out>/scenes/{train2017,val2017}/<12-digit id>.jpg
    <out>/scenes/annotations/instances_{train2017,val2017}.json   (boxes, category names)
    <out>/scenes/annotations/captions_{train2017,val2017}.json    (generated from the contents)
    <out>/objects/{train,val}/<class>/<id>.png                    (object-centric variant: one
                                                                   object per image, the
                                                                   ImageNet analogue, `folder` task)
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import InputError, ScenesConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUNDS = (
    "brick",
    "grass",
    "gravel",
    "coffee",
    "chelsea",
    "rocket",
    "astronaut",
    "immunohistochemistry",
    "hubble_deep_field",
    "moon",
    "camera",
    "coins",
)
OBJECT_SOURCES = ("fashion_mnist", "digits", "animal_mnist")


class MissingObjectData(InputError):
    """The object images a scene set needs are not installed; the message says what to install."""


@dataclass(frozen=True)
class ObjectSet:
    """Real object images (N, h, w) uint8 intensity on black, by split, with their class names and
    their indices in the source dataset (provenance, written into each COCO annotation)."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    train_index: np.ndarray | None = None  # index of each train object in the source's own numbering
    test_index: np.ndarray | None = None


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2049:  # labels
        return np.frombuffer(data, np.uint8, count, 8).astype(np.int64)
    rows, cols = struct.unpack(">II", data[8:16])
    return np.frombuffer(data, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)


def load_fashion_mnist(root: str | None = None) -> ObjectSet:
    root = root or FASHION_MNIST_DIR
    files = {
        k: os.path.join(root, f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz")
        for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")
    }
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise MissingObjectData(
            f"Fashion-MNIST not found ({missing[0]}): install it with `apt-get install dataset-fashion-mnist` "
            "(Debian, 30 MB), or use scenes.objects=digits (ships with scikit-learn)"
        )
    train, test = _read_idx(files["train-images"]), _read_idx(files["t10k-images"])
    return ObjectSet(
        train,
        _read_idx(files["train-labels"]),
        test,
        _read_idx(files["t10k-labels"]),
        FASHION_MNIST_CLASSES,
        np.arange(len(train)),
        len(train) + np.arange(len(test)),  # t10k numbered after the 60,000 train images
    )


def load_digits_objects(test_fraction: float = 0.3, seed: int = 0) -> ObjectSet:
    """scikit-learn's 1,797 digit scans, split per class into disjoint train/test object images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return ObjectSet(images[train], digits.target[train], images[test], digits.target[test], DIGIT_CLASSES, train, test)


def load_animal_mnist(test_fraction: float = 0.2, seed: int = 0) -> ObjectSet:
    try:
        import animal_mnist  # noqa: F401
    except ImportError:
        raise MissingObjectData(
            "Animal-MNIST not found: install it with `pip install --no-deps animal-mnist==0.4`, "
            "or use scenes.objects=digits"
        ) from None
    from animal_mnist import load_data  # type: ignore[import-not-found]

    (x_train, y_train), (x_test, y_test) = load_data()
    images = np.concatenate([x_train, x_test]).astype(np.uint8)
    labels = np.concatenate([y_train, y_test]).astype(np.int64)
    if images.ndim == 4:
        images = images[..., 0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    names = tuple(getattr(animal_mnist, "CLASSES", [f"animal {i}" for i in range(int(labels.max()) + 1)]))
    train, test = order[n_test:], order[:n_test]
    return ObjectSet(images[train], labels[train], images[test], labels[test], names, train, test)


def load_objects(source: str) -> ObjectSet:
    if source == "fashion_mnist":
        return load_fashion_mnist()
    if source == "digits":
        return load_digits_objects()
    if source == "animal_mnist":
        return load_animal_mnist()
    raise ValueError(f"unknown object source {source!r}; choose one of {', '.join(OBJECT_SOURCES)}")


def load_backgrounds(size: int = 256) -> list[np.ndarray]:
    """scikit-image's shipped textures and photographs as RGB uint8 arrays (no download)."""
    import skimage.data

    out = []
    for name in BACKGROUNDS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a sample this skimage build lacks or would download
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = image[..., :3]
        pil = Image.fromarray(image)
        scale = size / min(pil.size)
        out.append(
            np.asarray(
                pil.resize(
                    (max(size, round(pil.size[0] * scale)), max(size, round(pil.size[1] * scale))), Image.BILINEAR
                )
            )
        )
    if not out:
        raise MissingObjectData("no scikit-image sample images found: reinstall scikit-image")
    return out


def _background(
    rng: np.random.Generator, backgrounds: list[np.ndarray], side: int, spec: ScenesConfig | None = None
) -> np.ndarray:
    source = backgrounds[rng.integers(len(backgrounds))]
    zoom = rng.uniform(1.0, 3.0)  # a window of side*zoom px, resized to the canvas
    window = min(int(side * zoom), source.shape[0], source.shape[1])
    y = rng.integers(0, source.shape[0] - window + 1)
    x = rng.integers(0, source.shape[1] - window + 1)
    patch = Image.fromarray(source[y : y + window, x : x + window]).resize((side, side), Image.BILINEAR)
    spec = spec or ScenesConfig()
    tint = rng.uniform(0.5, 1.0, size=3)
    dim = rng.uniform(*spec.background_dim)
    pixels = np.asarray(patch).astype(np.float32)
    if spec.background_contrast != 1.0:
        pixels = pixels.mean() + spec.background_contrast * (pixels - pixels.mean())
    return pixels * tint * dim


def _object_layer(rng: np.random.Generator, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An object image -> (RGB float (s, s, 3), alpha (s, s)) at `size` px, tinted a random colour."""
    pil = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    intensity = np.asarray(pil).astype(np.float32) / 255.0
    alpha = np.clip(intensity * 4.0, 0.0, 1.0)
    tint = rng.uniform(0.3, 1.0, size=3)
    tint = tint / tint.max()
    rgb = (0.25 + 0.75 * intensity)[..., None] * tint * 255.0
    return rgb, alpha


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compose_scene(
    rng: np.random.Generator, objects: np.ndarray, labels: np.ndarray, backgrounds: list[np.ndarray], spec: ScenesConfig
):
    """One scene: (RGB uint8 (canvas, canvas, 3), boxes (K, 4) float pixel xyxy, labels (K,), object indices (K,))."""
    side = spec.canvas
    canvas = _background(rng, backgrounds, side, spec)
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    boxes, classes, used = [], [], []
    for _ in range(wanted * 10):  # rejection sampling for low overlap; a crowded scene just gets fewer objects
        if len(boxes) == wanted:
            break
        index = int(rng.integers(len(objects)))
        size = int(rng.integers(spec.min_size, spec.max_size + 1))
        x0, y0 = int(rng.integers(0, side - size + 1)), int(rng.integers(0, side - size + 1))
        rgb, alpha = _object_layer(rng, objects[index], size)
        ys, xs = np.nonzero(alpha > 0.1)
        if len(xs) == 0:
            continue
        box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], dtype=np.float64)
        if any(_iou(box, other) > spec.max_overlap for other in boxes):
            continue
        region = canvas[y0 : y0 + size, x0 : x0 + size]
        region[...] = region * (1 - alpha[..., None]) + rgb * alpha[..., None]
        boxes.append(box)
        classes.append(int(labels[index]))
        used.append(index)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return (
        image,
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(classes, dtype=np.int64),
        np.array(used, dtype=np.int64),
    )


def compose_object(
    rng: np.random.Generator, image: np.ndarray, backgrounds: list[np.ndarray], spec: ScenesConfig
) -> np.ndarray:
    """Object-centric variant: one object, large and roughly centred, on the same kind of background."""
    side = spec.object_canvas
    canvas = _background(rng, backgrounds, side, spec)
    size = int(round(spec.object_size * rng.uniform(0.8, 1.0)))
    jitter = (side - size) // 2
    x0 = int(np.clip(jitter + rng.integers(-jitter // 2, jitter // 2 + 1), 0, side - size))
    y0 = int(np.clip(jitter + rng.integers(-jitter // 2, jitter // 2 + 1), 0, side - size))
    rgb, alpha = _object_layer(rng, image, size)
    region = canvas[y0 : y0 + size, x0 : x0 + size]
    region[...] = region * (1 - alpha[..., None]) + rgb * alpha[..., None]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" and not name.startswith(("one", "uni", "eu")) else "a"


def caption(boxes: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    """Two captions generated from a scene's contents: "a sneaker above a bag", "a sneaker, a bag and a coat"."""
    names = [classes[int(c)] for c in labels]
    if not names:
        return ["an empty scene"]
    listed = [f"{_article(n)} {n}" for n in names]
    inventory = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    if len(names) == 1:
        cx = (boxes[0, 0] + boxes[0, 2]) / 2
        where = (
            "on the left" if cx < 0.4 * boxes.max() else "on the right" if cx > 0.6 * boxes.max() else "in the middle"
        )
        return [f"a photo of {inventory}", f"{inventory} {where}"]
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    a, b = int(order[0]), int(order[1])
    dx = (boxes[a, 0] + boxes[a, 2] - boxes[b, 0] - boxes[b, 2]) / 2
    dy = (boxes[a, 1] + boxes[a, 3] - boxes[b, 1] - boxes[b, 3]) / 2
    relation = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
    pair = f"{_article(names[a])} {names[a]} {relation} {_article(names[b])} {names[b]}"
    return [pair, f"a photo of {inventory}"] if rng.random() < 0.5 else [f"a photo of {inventory}", pair]


def _coco_json(images: list[dict], annotations: list[dict], classes: tuple[str, ...], description: str) -> dict:
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)],
    }


def write_scenes(spec: ScenesConfig, out: str | os.PathLike | None = None, object_set: ObjectSet | None = None) -> dict:
    """Write the scene set (COCO layout) and its object-centric variant under `out` (default
    `spec.output`); returns a summary (also written to `<out>/scenes.json`).

    Deterministic: the same spec writes byte-identical files. Objects of the train split come only
    from the source's train images, val only from its test images. Re-running over a finished folder
    (its `scenes.json` holds the same spec) does nothing.
    """
    if not (out or spec.output):
        raise ValueError("scenes.output: give the folder to write the scene set to")
    root = Path(out or spec.output)
    params = json.loads(json.dumps(asdict(replace(spec, output=""))))
    marker = root / "scenes.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params:
            return done
    objects, seed, n_train, n_val = spec.objects, spec.seed, spec.n_train, spec.n_val
    n_objects_train, n_objects_val = n_train, n_val
    object_set = object_set or load_objects(objects)
    backgrounds = load_backgrounds()
    summary: dict = {"params": params, "classes": list(object_set.classes), "splits": {}}
    ann_dir = root / "scenes" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split, folder, n, n_obj, pool, pool_labels, pool_index, split_seed in (
        (
            "train",
            "train2017",
            n_train,
            n_objects_train,
            object_set.train,
            object_set.train_labels,
            object_set.train_index,
            0,
        ),
        ("val", "val2017", n_val, n_objects_val, object_set.test, object_set.test_labels, object_set.test_index, 1),
    ):
        if pool_index is None:
            pool_index = np.arange(len(pool))
        rng = np.random.default_rng([seed, split_seed])
        image_dir = root / "scenes" / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations, captions = [], [], []
        per_class = np.zeros(len(object_set.classes), np.int64)
        used_objects: set[int] = set()
        for i in range(n):
            image_id = i + 1
            image, boxes, labels, used = compose_scene(rng, pool, pool_labels, backgrounds, spec)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(image).save(image_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": spec.canvas, "height": spec.canvas})
            for box, label, used_index in zip(boxes, labels, used):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                        "source_index": int(pool_index[used_index]),  # the object image, in the source's numbering
                    }
                )
                per_class[label] += 1
            used_objects.update(int(u) for u in used)
            for text in caption(boxes, labels, object_set.classes, rng):
                captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        desc = f"abpipe scenes ({objects} objects, seed {seed}, {split})"
        (ann_dir / f"instances_{folder}.json").write_text(
            json.dumps(_coco_json(images, annotations, object_set.classes, desc))
        )
        (ann_dir / f"captions_{folder}.json").write_text(
            json.dumps({"info": {"description": desc}, "images": images, "annotations": captions})
        )

        obj_rng = np.random.default_rng([seed, split_seed, 2])
        obj_root = root / "objects" / split
        picks = obj_rng.choice(len(pool), size=min(n_obj, len(pool)), replace=n_obj > len(pool))
        for j, index in enumerate(picks):
            label = object_set.classes[int(pool_labels[index])]
            folder_path = obj_root / label.replace(" ", "_")
            folder_path.mkdir(parents=True, exist_ok=True)
            Image.fromarray(compose_object(obj_rng, pool[index], backgrounds, spec)).save(folder_path / f"{j:06d}.png")
        summary["splits"][split] = {
            "scenes": n,
            "boxes": len(annotations),
            "boxes_per_class": per_class.tolist(),
            "object_images_used": len(used_objects),
            "object_centric": int(len(picks)),
        }
    marker.write_text(json.dumps(summary, indent=1))
    return summary


def annotated_subset(root: str | os.PathLike, fraction: float, folder: str = "train2017") -> dict[str, str]:
    """A split's first `fraction` of scenes as their own COCO jsons (instances + captions), for runs whose
    annotations cover part of the data: ingesting them yields the annotated shard set, the full jsons the
    unlabelled one. The scenes are independent draws, so the first ones are a random sample. Returns
    {"instances": path, "captions": path}; rewritten on every call (it is cheap and deterministic)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"annotated fraction must be in (0, 1], got {fraction}")
    ann_dir = Path(root) / "scenes" / "annotations"
    tag = f"annotated{fraction * 100:g}"
    out = {}
    for kind in ("instances", "captions"):
        data = json.loads((ann_dir / f"{kind}_{folder}.json").read_text())
        n = max(1, int(np.ceil(fraction * len(data["images"]))))
        data["images"] = data["images"][:n]
        kept = {image["id"] for image in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
        data["info"] = {**data.get("info", {}), "description": f"{data['info']['description']}, first {n} scenes"}
        path = ann_dir / f"{kind}_{folder}_{tag}.json"
        path.write_text(json.dumps(data))
        out[kind] = str(path)
    return out
