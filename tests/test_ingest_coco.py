"""COCO ingest: real JPEG/PNG files and a COCO json written here, with every edge case the format has.

Boxes are checked against a reference re-implementation in this file (xywh -> clipped xyxy -> the
stored image's pixels), counts against a loop over the json.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import threading

import pytest
from PIL import Image

from pipeline.config import CocoIngestConfig, Config, IngestConfig, PathsConfig
from pipeline.data.shards import load_manifest, load_stats, read_shards
from pipeline.data.sources import coco
from pipeline.ingest import run_ingest

MAX_SIDE = 200
CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 7, "name": "dog", "supercategory": "animal"}]


def _ann(aid, image_id, bbox, cat=1, crowd=0):
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": crowd,
        "segmentation": [[0, 0, 1, 1, 1, 0]],
    }


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory, photo_files):
    root = tmp_path_factory.mktemp("coco")
    images = root / "val2017"
    images.mkdir()
    photo = Image.open(photo_files[0]).convert("RGB")
    photo.resize((400, 300)).save(images / "a.jpg", quality=90)
    photo.resize((120, 90)).save(images / "b.jpg", quality=90)
    photo.resize((300, 200)).save(images / "f.png")
    jpeg = (images / "a.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("1", (20_000, 10_000)).save(images / "bomb.png")  # > Pillow's limit: refused
    entries = [
        {"id": 1, "file_name": "a.jpg", "width": 400, "height": 300},
        {"id": 2, "file_name": "b.jpg", "width": 120, "height": 90},  # no annotations: kept, no boxes
        {"id": 3, "file_name": "c.jpg", "width": 64, "height": 64},  # not on disk: missing
        {"id": 4, "file_name": "d.jpg"},  # no size: bad_annotation
        {"id": 1, "file_name": "e.jpg", "width": 10, "height": 10},  # duplicate id: bad_annotation
        {"id": 5, "file_name": "bomb.png", "width": 20_000, "height": 10_000},
        {"id": 6, "file_name": "f.png", "width": 300, "height": 200},
        {"id": 8, "file_name": "trunc.jpg", "width": 400, "height": 300},
    ]
    anns = [
        _ann(1, 1, [10, 20, 100, 50]),
        _ann(2, 1, [0, 0, 50, 50], cat=7, crowd=1),
        _ann(3, 1, [10, 10, 0, 30]),  # zero width
        _ann(4, 1, [350, 250, 100, 100]),  # half outside: clipped
        _ann(5, 1, [500, 500, 10, 10]),  # fully outside: empty after clipping
        _ann(6, 1, [10, 10, 20, 20], cat=99),  # unknown category
        _ann(7, 1, [1, 2, 3]),  # malformed
        _ann(8, 1, [10, 10, 20, -5]),  # negative height
        _ann(9, 1, [10, 10, 0.5, 20]),  # thinner than min_box_side
        _ann(10, 6, [20.5, 30, 40, 50.25], cat=7),
        _ann(11, 999, [1, 1, 5, 5]),  # an image id not in images[]
    ]
    instances = {"info": {}, "licenses": [], "images": entries, "annotations": anns, "categories": CATEGORIES}
    captions = {
        "images": entries,
        "annotations": [
            {"id": 31, "image_id": 1, "caption": "A cat on a mat. "},
            {"id": 12, "image_id": 1, "caption": "A small cat."},
            {"id": 40, "image_id": 6, "caption": "A dog."},
        ],
    }
    (root / "instances_val2017.json").write_text(json.dumps(instances))
    (root / "captions_val2017.json").write_text(json.dumps(captions))
    return root, images, instances


def _cfg(images_dir, root, out, **coco_kw) -> Config:
    cc = CocoIngestConfig(
        instances=str(root / "instances_val2017.json"), captions=str(root / "captions_val2017.json"), **coco_kw
    )
    return Config(
        paths=PathsConfig(root=str(root.parent / "runs")),
        ingest=IngestConfig(
            source="coco", input=str(images_dir), output=str(out), max_side=MAX_SIDE, samples_per_shard=3, coco=cc
        ),
    )


def _reference(instances: dict, stored: dict[int, tuple[int, int]], min_side: float = 1.0):
    """Expected boxes/labels per kept image id and the annotation counts, by a plain loop."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    size = {}
    for e in instances["images"]:  # the first entry of an id is the image; a duplicate is skipped
        if "width" in e:
            size.setdefault(e["id"], (e["width"], e["height"]))
    boxes = {i: [] for i in stored}
    counts = dict.fromkeys(
        [
            "boxes_clipped",
            "boxes_dropped_crowd",
            "boxes_dropped_degenerate",
            "boxes_dropped_unknown_category",
            "boxes_kept",
            "boxes_kept_crowd",
        ],
        0,
    )
    for a in instances["annotations"]:
        if a["image_id"] not in stored:
            continue
        if a["iscrowd"]:
            counts["boxes_dropped_crowd"] += 1
            continue
        if a["category_id"] not in names:
            counts["boxes_dropped_unknown_category"] += 1
            continue
        jw, jh = size[a["image_id"]]
        if len(a["bbox"]) != 4 or a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            counts["boxes_dropped_degenerate"] += 1
            continue
        x, y, w, h = a["bbox"]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(jw, x + w), min(jh, y + h)
        if x1 - x0 < min_side or y1 - y0 < min_side:
            counts["boxes_dropped_degenerate"] += 1
            continue
        counts["boxes_kept"] += 1
        counts["boxes_clipped"] += (x0, y0, x1, y1) != (x, y, x + w, y + h)
        sw, sh = stored[a["image_id"]][0] / jw, stored[a["image_id"]][1] / jh
        boxes[a["image_id"]].append(([x0 * sw, y0 * sh, x1 * sw, y1 * sh], names[a["category_id"]]))
    return boxes, counts


def _stored_size(w, h):
    scale = min(1.0, MAX_SIDE / max(w, h))
    return (round(w * scale), round(h * scale)) if scale < 1 else (w, h)


def _check_shards(out, instances):
    rows = {json.loads(r["json"])["id"]: (json.loads(r["json"]), r) for r in read_shards(str(out)).take_all()}
    assert sorted(rows) == ["1", "2", "6"]
    stored = {int(i): (m["width"], m["height"]) for i, (m, _) in rows.items()}
    assert stored == {1: _stored_size(400, 300), 2: (120, 90), 6: _stored_size(300, 200)}
    ref_boxes, ref_counts = _reference(instances, stored)
    for image_id, (meta, row) in rows.items():
        expected = ref_boxes[int(image_id)]
        assert meta.get("labels", []) == [label for _, label in expected]
        assert len(meta.get("boxes", [])) == len(expected)
        for box, (ref, _) in zip(meta.get("boxes", []), expected):
            assert box == pytest.approx(ref, abs=1e-9)
    assert rows["1"][0]["captions"] == ["A cat on a mat.", "A small cat."] and rows["1"][1]["txt"] == b"A cat on a mat."
    assert "boxes" not in rows["2"][0] and "captions" not in rows["2"][0], "an image without annotations is kept, empty"
    return ref_counts


def test_coco_boxes_labels_captions_and_every_skip(ray_cluster, coco_set, tmp_path, capsys):
    root, images, instances = coco_set
    stats = run_ingest(_cfg(images, root, tmp_path / "shards"))
    assert stats["counts"] == {"ok": 3, "missing": 1, "truncated": 1, "too_large": 1, "bad_annotation": 2}
    assert "1 annotations name an image id absent" in capsys.readouterr().out
    manifest = load_manifest(str(tmp_path / "shards")).set_index("input")
    assert manifest.loc[str(images / "bomb.png"), "status"] == "too_large", "decompression bomb refused"
    assert "duplicate image id 1" in manifest.loc[str(images / "e.jpg"), "detail"]
    assert "width/height" in manifest.loc[str(images / "d.jpg"), "detail"]
    ref_counts = _check_shards(tmp_path / "shards", instances)
    assert stats["annotations"] == ref_counts
    assert ref_counts["boxes_dropped_degenerate"] == 5 and ref_counts["boxes_clipped"] == 1, "fixture covers each case"
    assert stats["labels"] == ["cat", "dog"]


def test_coco_over_http_into_an_fsspec_filesystem(ray_cluster, coco_set, tmp_path):
    """Images from a real HTTP server (fsspec's http), shards into an fsspec-only URI (simplecache::file)."""
    root, images, instances = coco_set
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = f"simplecache::file://{tmp_path}/shards"
        stats = run_ingest(_cfg(f"http://127.0.0.1:{server.server_port}/", root, out))
    finally:
        server.shutdown()
    assert stats["counts"] == {"ok": 3, "missing": 1, "truncated": 1, "too_large": 1, "bad_annotation": 2}
    assert (tmp_path / "shards" / "manifest.parquet").is_file() and load_stats(out)["counts"] == stats["counts"]
    assert stats["annotations"] == _check_shards(out, instances)


def test_include_crowd_and_min_box_side(coco_set):
    """The listing alone: crowd boxes kept on request; a larger min side drops more."""
    root, images, _ = coco_set

    def image_a(**kw):
        items = coco.list_items(_cfg(images, root, root / "x", **kw).ingest)
        return next(it for it in items if it["input"] == str(images / "a.jpg"))

    a = image_a(include_crowd=True, min_box_side=40)
    assert a["labels"] == ["cat", "dog", "cat"] and a["boxes"][1] == [0.0, 0.0, 50.0, 50.0]
    assert (
        a["counts"]["boxes_kept_crowd"] == 1
        and a["counts"]["boxes_dropped_crowd"] == 0
        and a["counts"]["boxes_dropped_degenerate"] == 5
    )
    assert a["box_frame"] == [400.0, 300.0]
    a = image_a(include_crowd=True, min_box_side=60)  # 100x50, 50x50 and the clipped 50x50 now too thin
    assert a["boxes"] == [] and a["counts"]["boxes_dropped_degenerate"] == 8
    assert coco.coco_box([0, 0, math.inf, 3], 10, 10, 1.0) == (None, False)


def test_bad_annotation_files_name_the_file(coco_set, tmp_path):
    root, images, _ = coco_set
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid json"):
        coco.list_items(
            IngestConfig(
                source="coco", input=str(images), coco=CocoIngestConfig(instances=str(tmp_path / "broken.json"))
            )
        )
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="other.json: missing or malformed 'annotations'"):
        coco.list_items(
            IngestConfig(
                source="coco", input=str(images), coco=CocoIngestConfig(instances=str(tmp_path / "other.json"))
            )
        )
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco.list_items(
            IngestConfig(source="coco", input=str(images), coco=CocoIngestConfig(instances=str(tmp_path / "nope.json")))
        )
