"""Resumable shard writing (kill an ingest, re-run, it continues), sample metadata, one storage path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data import shards
from pipeline.data.shards import load_manifest, write_shards
from pipeline.storage import filesystem

REPO = Path(__file__).resolve().parents[1]
WRITE_IN_SUBPROCESS = """
import json, sys
sys.path.insert(0, sys.argv[4])
import ray
from pipeline.config import IngestConfig
from pipeline.data.shards import write_shards
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
write_shards(json.load(open(sys.argv[2])), sys.argv[3], "files", IngestConfig(max_side=48, samples_per_shard=3))
"""


def _tar_keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            keys += [n.split(".")[0] for n in t.getnames() if n.endswith(".json")]
    return keys


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory, photo_files):
    """Four 1800x1350 JPEGs: slow enough to decode that an ingest of them can be caught mid-way."""
    folder = tmp_path_factory.mktemp("big")
    paths = []
    for i, p in enumerate(photo_files[:4]):
        Image.open(p).convert("RGB").resize((1800, 1350)).save(folder / f"big{i}.jpg", quality=95)
        paths.append(str(folder / f"big{i}.jpg"))
    return paths


def test_killed_ingest_resumes_without_rewriting_finished_shards(ray_cluster, big_photos, tmp_path, capsys):
    items = [{"input": big_photos[i % 4], "id": f"img{i:03d}", "labels": [f"c{i % 3}"]} for i in range(120)]
    n_shards = 40
    (tmp_path / "items.json").write_text(json.dumps(items))
    out = tmp_path / "shards"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITE_IN_SUBPROCESS, address, str(tmp_path / "items.json"), str(out), str(REPO)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while len(list((out / "_parts").glob("*.parquet"))) < 3:
        assert proc.poll() is None, f"the ingest subprocess ended early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup, as when a node or job dies
    proc.wait()
    time.sleep(1.5)  # let Ray reap the dead driver's workers
    parts = sorted((out / "_parts").glob("*.parquet"))
    finished = {p.stem: (_identity(p), _identity(out / f"{p.stem}.tar")) for p in parts}
    assert 0 < len(finished) < n_shards, f"kill must land mid-way (finished {len(finished)} of {n_shards})"

    stats = write_shards(items, str(out), "files", IngestConfig(max_side=48, samples_per_shard=3))
    log = capsys.readouterr().out
    assert f"{len(finished)} of {n_shards} shards already finished" in log
    for stem, (part_id, tar_id) in finished.items():
        assert _identity(out / "_parts" / f"{stem}.parquet") == part_id and _identity(out / f"{stem}.tar") == tar_id, (
            f"{stem} was rewritten"
        )
    assert stats["counts"] == {"ok": 120} and len(stats["shards"]) == n_shards
    keys = _tar_keys(out)
    assert sorted(keys) == [f"{i:09d}" for i in range(120)], "every item exactly once: no duplicates, no gaps"
    manifest = load_manifest(str(out))
    assert len(manifest) == 120 and manifest["key"].is_unique and (manifest["status"] == "ok").all()
    assert not list(out.glob("*.tmp")) and not list((out / "_parts").glob("*.tmp"))


def test_rerun_same_items_keeps_everything_other_items_start_over(ray_cluster, photo_files, tmp_path, capsys):
    out = tmp_path / "shards"
    cfg = IngestConfig(max_side=64, samples_per_shard=2)
    items = [{"input": str(p), "id": p.stem} for p in photo_files[:5]]
    first = write_shards(items, str(out), "files", cfg)
    before = {p.name: _identity(p) for p in out.glob("shard-*.tar")}
    again = write_shards(items, str(out), "files", cfg)
    assert "3 of 3 shards already finished, writing 0" in capsys.readouterr().out
    assert again == first and {p.name: _identity(p) for p in out.glob("shard-*.tar")} == before
    fewer = write_shards(items[:2], str(out), "files", cfg)
    assert "holds a different ingest (items or settings changed): starting over" in capsys.readouterr().out
    assert fewer["counts"] == {"ok": 2} and sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["shard-000000.parquet"] and len(_tar_keys(out)) == 2


def test_every_sample_meta_field_reaches_the_json(photo_files, tmp_path):
    """The shard task alone: boxes move from the source's pixels to the stored image's, the rest is copied."""
    import dataclasses

    width, height = Image.open(photo_files[0]).size
    item = {
        "key": "000000000",
        "input": str(photo_files[0]),
        "id": "x",
        "labels": ["a", "b"],
        "captions": ["one", "two"],
        "boxes": [[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, float(width), float(height)]],
        "video": "P01_01",
        "frame": 31,
        "action": {"verb": "take", "noun": "cup", "narration": "take cup"},
    }
    manifest = shards._write_one_shard(
        {"shard_index": 0, "items_json": json.dumps([item])},
        str(tmp_path),
        "src",
        dataclasses.asdict(IngestConfig(max_side=128)),
    )
    assert manifest[0]["status"] == "ok"
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert tar.extractfile("000000000.txt").read() == b"one"
    s = meta["width"] / width
    assert max(meta["width"], meta["height"]) == 128 and meta["height"] == round(height * s)
    assert meta["boxes"][0] == pytest.approx([10 * s, 20 * s, 110 * s, 70 * meta["height"] / height])
    assert meta["boxes"][1] == [0.0, 0.0, meta["width"], meta["height"]]
    assert {k: meta[k] for k in ("labels", "captions", "video", "frame", "action", "source", "id")} == {
        k: item.get(k, v)
        for k, v in [
            ("labels", 0),
            ("captions", 0),
            ("video", 0),
            ("frame", 0),
            ("action", 0),
            ("source", "src"),
            ("id", 0),
        ]
    }
    assert (tmp_path / "_parts" / "shard-000000.parquet").is_file()


def test_one_filesystem_function_for_paths_pyarrow_and_fsspec_uris(tmp_path):
    import pyarrow.fs as pafs

    fs, path = filesystem(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath(tmp_path / "a")
    fs, path = filesystem(f"file://{tmp_path}/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a"
    for uri in (f"simplecache::file://{tmp_path}/a", "memory://bucket/a", "http://127.0.0.1:9/a.jpg"):
        fs, _ = filesystem(uri)
        assert isinstance(fs, pafs.PyFileSystem), f"{uri}: pyarrow does not know it, fsspec does"
    fs, path = filesystem("memory://bucket/x.bin")
    with fs.open_output_stream(path) as stream:
        stream.write(b"abc")
    assert shards.read_bytes("memory://bucket/x.bin") == b"abc"
    with pytest.raises(ValueError, match="nosuchfs://x/y.*nosuchfs"):
        filesystem("nosuchfs://x/y")
