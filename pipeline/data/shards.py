"""Write and read the shard sets training and eval consume: WebDataset tars + manifest + stats.

Writing is a Ray Data job with one task per shard: each task validates its inputs, re-encodes at
most once, writes one tar and returns one manifest row per input (kept or skipped, with a reason).
All I/O goes through pyarrow filesystems, so `out_dir` may be a local path or an s3:// / gs:// URI.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any

from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.schema import MANIFEST_COLUMNS, MISSING, OK, STATUSES, BadImage, SampleMeta, decode_rgb

MANIFEST_FILE = "manifest.parquet"
STATS_FILE = "_stats.json"
JPEG_MAGIC = b"\xff\xd8\xff"


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow understands."""
    import pyarrow.fs as pafs

    if "://" in str(uri):
        return pafs.FileSystem.from_uri(str(uri))
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_sample(data: bytes, cfg: IngestConfig) -> tuple[bytes, int, int]:
    """Validated JPEG bytes and their size: original bytes when already a small enough JPEG."""
    rgb = decode_rgb(data, min_side=cfg.min_side)
    height, width = rgb.shape[:2]
    if data[:3] == JPEG_MAGIC and max(width, height) <= cfg.max_side:
        return data, width, height
    image = Image.fromarray(rgb)
    if max(width, height) > cfg.max_side:
        image.thumbnail((cfg.max_side, cfg.max_side), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), image.size[0], image.size[1]


def _write_one_shard(row: dict[str, Any], out_dir: str, source: str, cfg_dict: dict) -> list[dict[str, Any]]:
    """Ray Data flat_map body: write one tar; never raises for a bad input, only counts it."""
    import webdataset as wds

    cfg = IngestConfig(**cfg_dict)
    items = json.loads(row["items_json"])
    name = shard_name(int(row["shard_index"]))
    fs, base = filesystem(out_dir)
    manifest, written = [], 0
    tmp_path = posixpath.join(base, name + ".tmp")
    with fs.open_output_stream(tmp_path) as stream:
        writer = wds.TarWriter(stream)
        for item in items:
            entry = {"key": item["key"], "shard": "", "source": source, "status": OK, "detail": "", "input": item["input"]}
            try:
                try:
                    data = read_bytes(item["input"])
                except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as exc:
                    raise BadImage(MISSING, str(exc)) from None
                jpg, width, height = encode_sample(data, cfg)
                meta = SampleMeta(source=source, id=item.get("id", item["key"]), width=width, height=height, labels=item.get("labels", []), captions=item.get("captions", []))
                sample = {"__key__": item["key"], "jpg": jpg, "json": meta.to_json()}
                if meta.captions:
                    sample["txt"] = meta.captions[0].encode()
                writer.write(sample)
                written += 1
                entry["shard"] = name
            except BadImage as exc:
                entry.update(status=exc.reason, detail=exc.detail[:500])
            except Exception as exc:  # anything unforeseen is a counted skip, never a dead worker
                entry.update(status="corrupt", detail=f"{type(exc).__name__}: {exc}"[:500])
            manifest.append(entry)
        writer.close()
    if written:
        fs.move(tmp_path, posixpath.join(base, name))
    else:
        fs.delete_file(tmp_path)
    return manifest


def write_shards(items: list[dict[str, Any]], out_dir: str, source: str, cfg: IngestConfig) -> dict[str, Any]:
    """Ingest `items` ([{input, id, labels?, captions?}]) into `out_dir`; returns the stats dict.

    Re-running into the same `out_dir` replaces the previous shard set.
    """
    import dataclasses

    import pandas as pd
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    fs, base = filesystem(out_dir)
    fs.create_dir(base, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(base)):
        if info.base_name.startswith("shard-") or info.base_name in (MANIFEST_FILE, STATS_FILE):
            fs.delete_file(info.path)

    per_shard = max(1, cfg.samples_per_shard)
    keyed = [{**item, "key": f"{i:09d}"} for i, item in enumerate(items)]
    groups = [
        {"shard_index": s, "items_json": json.dumps(keyed[i : i + per_shard])}
        for s, i in enumerate(range(0, len(keyed), per_shard))
    ]
    cfg_dict = dataclasses.asdict(cfg)
    manifest_rows: list[dict[str, Any]] = []
    if groups:
        ds = ray.data.from_items(groups, override_num_blocks=len(groups))
        ds = ds.flat_map(_write_one_shard, fn_kwargs={"out_dir": out_dir, "source": source, "cfg_dict": cfg_dict})
        manifest_rows = ds.take_all()
    manifest = pd.DataFrame(manifest_rows, columns=list(MANIFEST_COLUMNS)).sort_values("key").reset_index(drop=True)
    with fs.open_output_stream(posixpath.join(base, MANIFEST_FILE)) as stream:
        pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), stream)

    counts = {status: int((manifest["status"] == status).sum()) for status in STATUSES}
    labels = sorted({label for item in items for label in item.get("labels", [])})
    stats = {
        "source": source,
        "total": len(items),
        "counts": {k: v for k, v in counts.items() if v or k == OK},
        "shards": sorted(s for s in manifest["shard"].unique() if s),
        "labels": labels,
        "max_side": cfg.max_side,
    }
    with fs.open_output_stream(posixpath.join(base, STATS_FILE)) as stream:
        stream.write(json.dumps(stats, indent=1).encode())
    return stats


def load_stats(shard_dir: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(posixpath.join(str(shard_dir), STATS_FILE)))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {STATS_FILE} in {shard_dir}: run `abpipe ingest` first (or check data.shards)") from None


def load_manifest(shard_dir: str):
    import pyarrow.parquet as pq

    fs, base = filesystem(str(shard_dir))
    with fs.open_input_file(posixpath.join(base, MANIFEST_FILE)) as fh:
        return pq.read_table(fh).to_pandas()


def read_shards(shard_dir: str, shuffle: str | None = None, num_cpus: float | None = None):
    """Ray Dataset of the kept samples: columns `__key__` (str), `jpg` (bytes), `json` (bytes), `__url__`.

    Columns are left as WebDataset names: a rename/select would add a separate Ray Data operator
    (and CPU slot) in front of the crop actors for no gain.
    """
    import ray.data

    stats = load_stats(shard_dir)
    if not stats["shards"]:
        raise ValueError(f"{shard_dir} holds no usable samples (counts: {stats['counts']})")
    sep = "/" if "://" in str(shard_dir) else os.sep
    paths = [str(shard_dir).rstrip("/") + sep + name for name in stats["shards"]]
    return ray.data.read_webdataset(paths, decoder=None, shuffle=shuffle, num_cpus=num_cpus)

