"""The scenes generator (pipeline/data/scenes.py): a COCO-layout scene set composed from real object images.

Uses scikit-learn's digits as objects (always installed), so it needs no extra package. Checked: the
COCO json loads in pycocotools and every box is a tight box of a pasted object (recomputed here from
the pixels), the split never shares an object image, the same seed writes the same bytes, the
captions name what is in the image, and the eval job's COCO tasks and the folder task read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ScenesConfig
from pipeline.data import scenes
from pipeline.eval.tasks import load_task

N_TRAIN, N_VAL = 24, 12
SPEC = ScenesConfig(objects="digits", n_train=N_TRAIN, n_val=N_VAL, seed=3)


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    scenes.write_scenes(SPEC, root)
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_coco_json_loads_in_pycocotools_with_boxes_inside_images(scene_root):
    from pycocotools.coco import COCO

    for folder, n in (("train2017", N_TRAIN), ("val2017", N_VAL)):
        coco = COCO(str(scene_root / "scenes" / "annotations" / f"instances_{folder}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(scenes.DIGIT_CLASSES)
        assert len(coco.getAnnIds()) >= n  # at least one object per scene
        for ann in coco.loadAnns(coco.getAnnIds()):
            info = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"]
            assert ann["area"] == pytest.approx(w * h)
            assert (scene_root / "scenes" / folder / info["file_name"]).is_file()


def test_boxes_are_the_tight_boxes_of_the_pasted_objects():
    """Recompute each box from the pixels: paste onto a constant background and diff."""
    objects = scenes.load_digits_objects()
    flat = [np.full((256, 256, 3), 40, np.uint8)]
    spec = ScenesConfig()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        image, boxes, labels, used = scenes.compose_scene(rng, objects.train, objects.train_labels, flat, spec)
        assert len(boxes) == len(labels) == len(used) >= spec.min_objects
        assert (labels == objects.train_labels[used]).all()
        background = scenes._background(np.random.default_rng(seed), flat, spec.canvas, spec)
        changed = np.abs(image.astype(np.float32) - background).max(-1) > 0.1 * 255 * 0.25
        union = np.zeros_like(changed)
        for x0, y0, x1, y1 in boxes.astype(int):
            union[y0:y1, x0:x1] = True
            inside = changed[y0:y1, x0:x1]
            assert inside[0].any() or inside[1].any()  # the object reaches the top edge of its box
            assert inside[:, 0].any() or inside[:, 1].any()  # and the left one
        assert not (changed & ~union).any()  # nothing was pasted outside the boxes


def test_train_and_val_never_share_an_object_image(scene_root):
    objects = scenes.load_digits_objects()
    assert not set(objects.train_index.tolist()) & set(objects.test_index.tolist())
    used = {}
    for folder in ("train2017", "val2017"):
        data = json.loads((scene_root / "scenes" / "annotations" / f"instances_{folder}.json").read_text())
        used[folder] = {a["source_index"] for a in data["annotations"]}
    assert used["train2017"] <= set(objects.train_index.tolist())
    assert used["val2017"] <= set(objects.test_index.tolist())


def test_same_seed_same_bytes_other_seed_other_scenes(scene_root, tmp_path):
    again = tmp_path / "again"
    scenes.write_scenes(SPEC, again)
    assert _digest(again) == _digest(scene_root)
    other = tmp_path / "other"
    scenes.write_scenes(dataclasses.replace(SPEC, seed=4), other)
    assert _digest(other) != _digest(scene_root)


def test_captions_name_the_objects_in_the_scene(scene_root):
    inst = json.loads((scene_root / "scenes" / "annotations" / "instances_train2017.json").read_text())
    caps = json.loads((scene_root / "scenes" / "annotations" / "captions_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    for image in inst["images"]:
        present = {names[a["category_id"]] for a in inst["annotations"] if a["image_id"] == image["id"]}
        texts = [c["caption"] for c in caps["annotations"] if c["image_id"] == image["id"]]
        assert len(texts) == 2
        inventory = next(t for t in texts if t.startswith("a photo of"))
        assert {n for n in scenes.DIGIT_CLASSES if f" {n}" in inventory} == present


def test_annotated_subset_is_the_first_scenes_with_all_their_boxes_and_captions(scene_root, tmp_path):
    import shutil

    from pycocotools.coco import COCO

    ann = tmp_path / "scenes" / "annotations"  # a copy: the shared scene set stays as written
    shutil.copytree(scene_root / "scenes" / "annotations", ann)
    full = COCO(str(ann / "instances_train2017.json"))
    subset = scenes.annotated_subset(tmp_path, 0.25)
    assert subset["instances"].endswith("instances_train2017_annotated25.json")
    part = COCO(subset["instances"])
    kept = sorted(full.getImgIds())[: N_TRAIN // 4]  # ceil(0.25 x 24) = 6 scenes, in file order
    assert sorted(part.getImgIds()) == kept
    for image_id in kept:  # every box of a kept scene, unchanged; none of the others
        assert part.loadAnns(part.getAnnIds(imgIds=image_id)) == full.loadAnns(full.getAnnIds(imgIds=image_id))
    assert len(part.getAnnIds()) == len(full.getAnnIds(imgIds=kept))
    caps = json.loads(Path(subset["captions"]).read_text())
    every = json.loads((ann / "captions_train2017.json").read_text())
    assert caps["annotations"] == [c for c in every["annotations"] if c["image_id"] in set(kept)]
    assert len(COCO(scenes.annotated_subset(tmp_path, 0.1)["instances"]).getImgIds()) == 3  # ceil(2.4)
    with pytest.raises(ValueError, match="annotated fraction"):
        scenes.annotated_subset(tmp_path, 0.0)


def test_relation_caption_follows_the_boxes():
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 30, 30], [40, 0, 60, 20]], float)  # the larger one (0) is left of the other
    texts = scenes.caption(boxes, np.array([1, 2]), scenes.DIGIT_CLASSES, rng)
    assert "a one left of a two" in texts
    boxes = np.array([[0, 40, 30, 64], [0, 0, 20, 20]], float)  # the larger one is below
    assert "a one below a two" in scenes.caption(boxes, np.array([1, 2]), scenes.DIGIT_CLASSES, rng)


def test_eval_tasks_read_the_scenes_and_the_object_centric_variant(scene_root):
    objects = load_task("coco_objects", str(scene_root / "scenes"))
    assert objects.info.class_names == list(scenes.DIGIT_CLASSES)
    assert len(objects.train) == N_TRAIN and len(objects.test) == N_VAL
    assert all(ex.boxes is not None and len(ex.boxes) == len(ex.box_labels) for ex in objects.test)
    detection = load_task("coco_detection", str(scene_root / "scenes"))
    assert len(detection.test) == N_VAL
    folder = load_task("folder", str(scene_root / "objects"))
    assert len(folder.train) == N_TRAIN and len(folder.test) == N_VAL
    sizes = {Image.open(ex.input).size for ex in folder.test}
    assert sizes == {(SPEC.object_canvas,) * 2}


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(scenes.MissingObjectData, match="apt-get install dataset-fashion-mnist"):
        scenes.load_fashion_mnist(str(tmp_path))


def test_unknown_object_source_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        scenes.load_objects("cifar")


def test_scenes_command_writes_the_set_and_a_missing_source_is_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    args = [
        "scenes",
        "--json",
        "scenes.objects=digits",
        "scenes.n_train=12",
        "scenes.n_val=6",
        f"paths.root={tmp_path}",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    root = tmp_path / "data" / "scenes_digits"
    assert result["output"] == str(root) and result["splits"]["train"]["scenes"] == 12
    assert len(list((root / "scenes" / "train2017").glob("*.jpg"))) == 12
    assert json.loads((root / "scenes.json").read_text())["splits"] == result["splits"]

    monkeypatch.setattr(scenes, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    assert main(["scenes", "scenes.objects=fashion_mnist", f"paths.root={tmp_path}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], lines
