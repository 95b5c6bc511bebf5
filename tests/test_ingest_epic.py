"""EPIC-KITCHENS-100 ingest on a tiny dataset written here in the official layouts and formats.

Every synthetic frame draws its own 0-based index as bit blocks (pipeline.data.synthetic_video), so
the tests check *which* frame each sample holds, for the mp4 and the rgb_frames paths alike.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Config, EpicIngestConfig, IngestConfig, PathsConfig
from pipeline.data.schema import BadImage
from pipeline.data.shards import load_manifest, read_shards
from pipeline.data.sources import epic_kitchens, frames
from pipeline.data.synthetic_video import read_frame_code, write_rgb_frames_dir, write_rgb_frames_tar, write_video
from pipeline.ingest import run_ingest

W, H = 192, 108  # 1920x1080 / 10: VISOR boxes shrink by exactly 10
STRIDE = 10
LENGTHS = {"P01_01": 90, "P02_01": 30}
# (narration_id, video, start_frame, stop_frame, verb, noun); P01_01_1 overlaps P01_01_0 on 15..20
ACTIONS = [
    ("P01_01_0", "P01_01", 1, 20, "take", "plate"),
    ("P01_01_1", "P01_01", 15, 40, "wash", "plate"),
    ("P01_01_2", "P01_01", 61, 75, "open", "tap"),
    ("P09_01_0", "P09_01", 1, 500, "cut", "onion"),  # a video we do not have: ignored
]
# VISOR frame (its own numbering) -> rgb_frames frame via frame_mapping.json (offset +1)
VISOR = {
    24: [
        ("left hand", [[[100.0, 200.0], [300.0, 210.0], [250.0, 400.0]]]),
        ("plate", [[[1000.0, 500.0], [1500.0, 520.0]], [[1200.0, 900.0]]]),
        ("sponge", []),
    ],
    40: [("tap", [[[10.0, 20.0], [30.0, 60.0], [20.0, 40.0]]])],
}


def _csv(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(epic_kitchens.CSV_COLUMNS)
        for nid, vid, start, stop, verb, noun in rows:
            out.writerow(
                [
                    nid,
                    vid[:3],
                    vid,
                    "00:00:01.00",
                    "00:00:00.00",
                    "00:00:02.00",
                    start,
                    stop,
                    f"{verb} {noun}",
                    verb,
                    1,
                    noun,
                    2,
                    f"['{noun}']",
                    "[2]",
                ]
            )


@pytest.fixture(scope="module")
def epic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("epic")
    for vid, n in LENGTHS.items():
        write_video(root / vid[:3] / "videos" / f"{vid}.MP4", n, W, H)
    (root / "P01" / "videos" / "P01_02.MP4").write_bytes(b"not a video" * 50)
    write_rgb_frames_tar(root / "P01" / "rgb_frames" / "P01_01.tar", LENGTHS["P01_01"], W, H)
    write_rgb_frames_dir(root / "P02" / "rgb_frames" / "P02_01", LENGTHS["P02_01"], W, H, skip=(11,))
    _csv(root / "EPIC_100_train.csv", ACTIONS + [("P01_01_9", "P01_01", 50, 10, "bad", "row")])
    visor = {
        "video_annotations": [
            {
                "image": {
                    "image_path": f"P01_01_seq_00001/P01_01_frame_{f:010d}.jpg",
                    "name": f"P01_01_frame_{f:010d}.jpg",
                    "subsequence": "P01_01_seq_00001",
                    "video": "P01_01",
                },
                "annotations": [
                    {"id": f"m{f}_{i}", "name": name, "class_id": i, "exhaustive": "y", "segments": segs}
                    for i, (name, segs) in enumerate(ents)
                ],
            }
            for f, ents in VISOR.items()
        ]
    }
    (root / "P01_01.json").write_text(json.dumps(visor))
    mapping = {"P01_01": {f"P01_01_frame_{f:010d}.jpg": f"frame_{f + 1:010d}.jpg" for f in VISOR}}
    (root / "frame_mapping.json").write_text(json.dumps(mapping))
    return root


def _cfg(root, out, layout: str) -> Config:
    epic = EpicIngestConfig(
        annotations_csv=str(root / "EPIC_100_train.csv"),
        frame_stride=STRIDE,
        layout=layout,
        visor_json=str(root / "P01_01.json"),
        visor_frame_mapping=str(root / "frame_mapping.json"),
    )
    return Config(
        paths=PathsConfig(root=str(root.parent / "runs")),
        ingest=IngestConfig(
            source="epic_kitchens", input=str(root), output=str(out), samples_per_shard=6, max_side=384, epic=epic
        ),
    )


def _expected_action(video: str, frame: int):
    """Reference: loop over the csv rows; the containing action that started last wins."""
    best = None
    for nid, vid, start, stop, verb, noun in ACTIONS:
        if vid == video and start <= frame <= stop and (best is None or start >= best[2]):
            best = (nid, verb, start)
    return best


def _expected_frames(video: str) -> list[int]:
    visor = {f + 1 for f in VISOR} if video == "P01_01" else set()
    return sorted(set(range(1, LENGTHS[video] + 1, STRIDE)) | visor)


def _samples(out) -> dict[tuple[str, int], tuple[dict, np.ndarray]]:
    rows = read_shards(str(out)).take_all()
    return {
        (m["video"], m["frame"]): (m, np.asarray(Image.open(io.BytesIO(r["jpg"]))))
        for r in rows
        for m in [json.loads(r["json"])]
    }


@pytest.fixture(scope="module")
def video_shards(ray_cluster, epic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("epic_video") / "shards"
    return run_ingest(_cfg(epic_root, out, "videos")), out


def test_video_frames_get_actions_and_visor_boxes(video_shards, capsys):
    stats, out = video_shards
    expected_ok = sum(len(_expected_frames(v)) for v in LENGTHS)
    assert stats["counts"] == {"ok": expected_ok, "corrupt": 1}, "the unreadable P01_02.MP4 is one counted item"
    manifest = load_manifest(str(out))
    bad = manifest[manifest["status"] == "corrupt"].iloc[0]
    assert bad["input"].endswith("P01_02.MP4") and "InvalidData" in bad["detail"]
    samples = _samples(out)
    assert sorted(samples) == sorted((v, f) for v in LENGTHS for f in _expected_frames(v))
    with_action = 0
    for (video, frame), (meta, image) in samples.items():
        assert read_frame_code(image) == frame - 1, (
            f"{video} frame {frame}: frame numbers are 1-based, decode index 0-based"
        )
        assert (meta["width"], meta["height"]) == (W, H) and meta["id"] == f"{video}/frame_{frame:010d}"
        ref = _expected_action(video, frame)
        if ref is None:
            assert "action" not in meta, f"{video} frame {frame} lies outside every action"
        else:
            with_action += 1
            assert (meta["action"]["narration_id"], meta["action"]["verb"]) == ref[:2]
            assert meta["action"]["narration"] == f"{meta['action']['verb']} {meta['action']['noun']}"
    assert (
        samples[("P01_01", 21)][0]["action"]["narration_id"] == "P01_01_1"
        and "action" not in samples[("P01_01", 41)][0]
    )
    # VISOR: frame 24 maps to rgb frame 25; boxes are the polygon extents, 1920x1080 -> 192x108
    for visor_frame, entities in VISOR.items():
        meta = samples[("P01_01", visor_frame + 1)][0]
        kept = [(name, segs) for name, segs in entities if segs]
        assert meta["labels"] == [name for name, _ in kept]
        for box, (_, segs) in zip(meta["boxes"], kept):
            pts = [p for poly in segs for p in poly]
            ref = [
                min(p[0] for p in pts) / 10,
                min(p[1] for p in pts) / 10,
                max(p[0] for p in pts) / 10,
                max(p[1] for p in pts) / 10,
            ]
            assert box == pytest.approx(ref, abs=1e-9)
    assert "boxes" not in samples[("P01_01", 31)][0]
    n_frames = expected_ok
    assert stats["annotations"] == {
        "frames_with_action": with_action,
        "frames_without_action": n_frames - with_action,
        "visor_boxes_dropped_empty": 1,
        "visor_boxes_kept": 3,
        "visor_frames": 2,
    }


def test_rgb_frames_match_the_video_frames(ray_cluster, epic_root, video_shards, tmp_path):
    """Same frame number from the mp4 and from rgb_frames (tar and folder): same picture."""
    _, video_out = video_shards
    stats = run_ingest(_cfg(epic_root, tmp_path / "shards", "rgb_frames"))
    expected_ok = sum(len(_expected_frames(v)) for v in LENGTHS) - 1
    assert stats["counts"] == {"ok": expected_ok, "missing": 1}, "frame 11 of P02_01 is absent from its folder"
    manifest = load_manifest(str(tmp_path / "shards"))
    assert manifest.loc[manifest["status"] == "missing", "input"].iloc[0].endswith("P02_01/frame_0000000011.jpg")
    from_frames, from_video = _samples(tmp_path / "shards"), _samples(video_out)
    assert len(from_frames) == expected_ok
    for key, (meta, image) in from_frames.items():
        assert read_frame_code(image) == key[1] - 1
        other_meta, other = from_video[key]
        assert np.abs(image.astype(float) - other.astype(float)).mean() < 6.0, f"{key}: video and rgb_frames disagree"
        assert meta.get("action") == other_meta.get("action") and meta.get("boxes") == other_meta.get("boxes")


def test_video_reader_seeks_over_gaps_and_counts_missing_frames(epic_root, monkeypatch):
    """Without Ray: far-apart frames through the seek path, frames past the end, a broken file."""
    monkeypatch.setattr(frames, "SEEK_GAP", 8)
    path = str(epic_root / "P01" / "videos" / "P01_01.MP4")
    got = dict(frames.iter_video_frames(path, [3, 27, 28, 61, 89, 90]))
    assert {i: read_frame_code(v) for i, v in got.items() if not isinstance(v, BadImage)} == {
        3: 3,
        27: 27,
        28: 28,
        61: 61,
        89: 89,
    }
    assert got[90].reason == "missing" and "past the video's end" in got[90].detail
    broken = dict(frames.iter_video_frames(str(epic_root / "P01" / "videos" / "P01_02.MP4"), [0, 5]))
    assert {v.reason for v in broken.values()} == {"corrupt"}
    assert frames.video_frame_count(path) == LENGTHS["P01_01"]


def test_bad_annotation_files_name_the_file(epic_root, tmp_path):
    cols = tmp_path / "short.csv"
    cols.write_text("narration_id,video_id,start_frame\nx,P01_01,1\n")
    cfg = _cfg(epic_root, tmp_path / "o", "videos").ingest
    with pytest.raises(ValueError, match="short.csv: missing columns"):
        epic_kitchens.list_items(IngestConfig(input=cfg.input, epic=EpicIngestConfig(annotations_csv=str(cols))))
    (tmp_path / "v.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="v.json: not a VISOR annotation file"):
        epic_kitchens.list_items(
            IngestConfig(input=cfg.input, epic=EpicIngestConfig(visor_json=str(tmp_path / "v.json")))
        )
    with pytest.raises(FileNotFoundError, match="no rgb_frames found"):
        epic_kitchens.list_items(IngestConfig(input=str(tmp_path), epic=EpicIngestConfig(layout="rgb_frames")))
