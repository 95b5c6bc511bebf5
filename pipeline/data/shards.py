"""Write and read the shard sets training and eval consume: WebDataset tars + manifest + stats.

Writing is a Ray Data job with one task per shard: each task validates its inputs, re-encodes at
most once, writes one tar and returns one manifest row per input (kept or skipped, with a reason).
An item names where its pixels come from: a file/URI (default), a member of a tar, or a frame of a
video; a task decodes all frames of one video (or members of one tar) in a single forward pass.

Resumable: each finished shard leaves its tar and then, atomically, its manifest part
(`_parts/shard-NNNNNN.parquet`). Re-running with the same items into the same `out_dir` keeps those
shards and writes only the missing ones; with different items (or settings) it starts over. The
final manifest and `_stats.json` are built from all parts.

All I/O goes through `pipeline.storage`, so `out_dir` and inputs may be local paths, pyarrow
URIs (s3://, gs://) or any fsspec protocol.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline import console
from pipeline.config import IngestConfig, section_from_dict
from pipeline.data.schema import MANIFEST_COLUMNS, MISSING, OK, STATUSES, TOO_SMALL, BadImage, SampleMeta, decode_rgb
from pipeline.storage import StorageError, check_access, explain, filesystem, read_bytes, write_atomic

__all__ = [
    "filesystem",
    "read_bytes",
    "encode_sample",
    "shard_name",
    "write_shards",
    "load_stats",
    "load_manifest",
    "read_shards",
]

MANIFEST_FILE = "manifest.parquet"
STATS_FILE = "_stats.json"
PLAN_FILE = "_plan.json"  # fingerprint of the items/settings the shards in this folder belong to
PARTS_DIR = "_parts"  # one manifest part per finished shard
JPEG_MAGIC = b"\xff\xd8\xff"
_SHARD_TAR = re.compile(r"shard-(\d+)\.tar")
_SHARD_PART = re.compile(r"shard-(\d+)\.parquet")
# Settings that change what a shard holds: a re-run with other values starts over.
_OUTPUT_SETTINGS = ("max_side", "min_side", "jpeg_quality", "samples_per_shard")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _part_name(index: int) -> str:
    return f"{PARTS_DIR}/shard-{index:06d}.parquet"


def _encode_rgb(rgb: np.ndarray, cfg: IngestConfig) -> tuple[bytes, int, int]:
    image = Image.fromarray(rgb)
    if max(image.size) > cfg.max_side:
        image.thumbnail((cfg.max_side, cfg.max_side), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), image.size[0], image.size[1]


def encode_sample(data: bytes, cfg: IngestConfig) -> tuple[bytes, int, int]:
    """Validated JPEG bytes and their size: original bytes when already a small enough JPEG."""
    rgb = decode_rgb(data, min_side=cfg.min_side)
    height, width = rgb.shape[:2]
    if data[:3] == JPEG_MAGIC and max(width, height) <= cfg.max_side:
        return data, width, height
    return _encode_rgb(rgb, cfg)


def encode_frame(rgb: np.ndarray, cfg: IngestConfig) -> tuple[bytes, int, int]:
    """A decoded video frame: same size checks as a file, then its one and only JPEG encode."""
    if min(rgb.shape[:2]) < cfg.min_side:
        raise BadImage(TOO_SMALL, f"{rgb.shape[1]}x{rgb.shape[0]} < {cfg.min_side}")
    return _encode_rgb(rgb, cfg)


# -- where an item's pixels come from ---------------------------------------------------------------


def _file_pixels(item: dict) -> bytes | BadImage:
    try:
        return read_bytes(item["input"])
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as exc:
        return BadImage(MISSING, str(exc))


def _load_pixels(items: list[dict]) -> Iterator[tuple[dict, bytes | np.ndarray | BadImage]]:
    """(item, encoded bytes | decoded RGB frame | BadImage) for every item, one pass per container.

    `loader` (default "file"): "file" reads `input`; "tar" reads member `member` of the tar `input`;
    "video" decodes 0-based frame `frame_index` of the video `input`. An item with `skip` =
    [reason, detail] was already found unusable while listing and is only recorded.
    """
    from pipeline.data.sources.frames import iter_tar_members, iter_video_frames

    containers: dict[tuple[str, str], list[dict]] = {}
    for item in items:
        if item.get("skip"):
            reason, detail = item["skip"]
            yield item, BadImage(reason, detail)
        elif item.get("loader", "file") == "file":
            yield item, _file_pixels(item)
        else:
            containers.setdefault((item["loader"], item["input"]), []).append(item)
    for (loader, uri), group in containers.items():
        if loader == "video":
            by_index: dict[int, list[dict]] = {}
            for item in group:
                by_index.setdefault(int(item["frame_index"]), []).append(item)
            for index, result in iter_video_frames(uri, by_index):
                for item in by_index[index]:
                    yield item, result
        elif loader == "tar":
            by_member: dict[str, list[dict]] = {}
            for item in group:
                by_member.setdefault(item["member"], []).append(item)
            for member, result in iter_tar_members(uri, by_member):
                for item in by_member[member]:
                    yield item, result
        else:
            for item in group:
                yield item, BadImage("corrupt", f"unknown loader {loader!r} for {uri}")


def _scaled_boxes(item: dict, pixels: bytes | np.ndarray, width: int, height: int) -> list[list[float]]:
    """The item's pixel xyxy boxes, moved from the frame they were drawn in to the stored image.

    `box_frame` = [w, h] names that frame (COCO's json size, VISOR's 1920x1080); without it the
    boxes are in the source image's own pixels.
    """
    boxes = item.get("boxes") or []
    if not boxes:
        return []
    if item.get("box_frame"):
        frame_w, frame_h = item["box_frame"]
    elif isinstance(pixels, np.ndarray):
        frame_h, frame_w = pixels.shape[:2]
    else:
        frame_w, frame_h = Image.open(io.BytesIO(pixels)).size
    sx, sy = width / float(frame_w), height / float(frame_h)
    return [
        [
            min(max(x0 * sx, 0.0), width),
            min(max(y0 * sy, 0.0), height),
            min(max(x1 * sx, 0.0), width),
            min(max(y1 * sy, 0.0), height),
        ]
        for x0, y0, x1, y1 in boxes
    ]


def _sample(item: dict, source: str, pixels: bytes | np.ndarray, cfg: IngestConfig) -> dict[str, Any]:
    if isinstance(pixels, np.ndarray):
        jpg, width, height = encode_frame(pixels, cfg)
    else:
        jpg, width, height = encode_sample(pixels, cfg)
    meta = SampleMeta(
        source=source,
        id=str(item.get("id", item["key"])),
        width=width,
        height=height,
        boxes=_scaled_boxes(item, pixels, width, height),
        labels=list(item.get("labels", [])),
        captions=list(item.get("captions", [])),
        video=item.get("video"),
        frame=item.get("frame"),
        action=item.get("action"),
    )
    sample = {"__key__": item["key"], "jpg": jpg, "json": meta.to_json()}
    if meta.captions:
        sample["txt"] = meta.captions[0].encode()
    return sample


def _write_one_shard(row: dict[str, Any], out_dir: str, source: str, cfg_dict: dict) -> list[dict[str, Any]]:
    """Ray Data flat_map body: write one tar, then its manifest part; never raises for a bad input."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    cfg = section_from_dict(IngestConfig, cfg_dict)
    items = json.loads(row["items_json"])
    index = int(row["shard_index"])
    name = shard_name(index)
    fs, base = filesystem(out_dir)
    rows, written = {}, 0
    # unique: a killed run's task may still be writing
    tmp_path = posixpath.join(base, f"{name}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open_output_stream(tmp_path) as stream:
        writer = wds.TarWriter(stream)
        for item, pixels in _load_pixels(items):
            entry = {
                "key": item["key"],
                "shard": "",
                "source": source,
                "status": OK,
                "detail": "",
                "input": _input_label(item),
            }
            try:
                if isinstance(pixels, BadImage):
                    raise pixels
                writer.write(_sample(item, source, pixels, cfg))
                written += 1
                entry["shard"] = name
            except BadImage as exc:
                entry.update(status=exc.reason, detail=exc.detail[:500])
            except Exception as exc:  # anything unforeseen is a counted skip, never a dead worker
                entry.update(status="corrupt", detail=f"{type(exc).__name__}: {exc}"[:500])
            rows[item["key"]] = entry
        writer.close()
    if written:
        fs.move(tmp_path, posixpath.join(base, name))
    else:
        fs.delete_file(tmp_path)
    manifest = [rows[item["key"]] for item in items]
    part = pd.DataFrame(manifest, columns=list(MANIFEST_COLUMNS))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(part, preserve_index=False), buf)
    fs.create_dir(posixpath.join(base, PARTS_DIR), recursive=True)
    write_atomic(fs, posixpath.join(base, _part_name(index)), buf.getvalue().to_pybytes())
    return manifest


def _input_label(item: dict) -> str:
    """The manifest's `input`: the file, or `container#member` / `container#frame=N`."""
    loader = item.get("loader", "file")
    if loader == "tar":
        return f"{item['input']}#{item['member']}"
    if loader == "video":
        return f"{item['input']}#frame_index={item['frame_index']}"
    return str(item["input"])


# -- resumable driver ------------------------------------------------------------------------------


def _fingerprint(groups_json: list[str], source: str, cfg: IngestConfig) -> str:
    digest = hashlib.sha256(json.dumps([source] + [getattr(cfg, k) for k in _OUTPUT_SETTINGS]).encode())
    for text in groups_json:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def _log(message: str) -> None:
    console.note(f"ingest: {message}")


def _ours(name: str) -> bool:
    """Files an ingest writes at the top of its folder (anything else there is left alone)."""
    return name.startswith("shard-") or name in (MANIFEST_FILE, STATS_FILE, PLAN_FILE)


def _prepare_out_dir(fs, base: str, out_dir: str, fingerprint: str, n_shards: int) -> set[int]:
    """Finished shard indices to keep; clears the folder when it holds another ingest's shards."""
    import pyarrow.fs as pafs

    fs.create_dir(base, recursive=True)
    entries = fs.get_file_info(pafs.FileSelector(base))
    parts_dir = posixpath.join(base, PARTS_DIR)
    parts = fs.get_file_info(pafs.FileSelector(parts_dir, allow_not_found=True))
    plan = None
    if any(e.base_name == PLAN_FILE for e in entries):
        try:
            with fs.open_input_stream(posixpath.join(base, PLAN_FILE)) as stream:
                plan = json.loads(stream.read())
        except (ValueError, OSError):
            plan = None
    if plan and plan.get("fingerprint") == fingerprint:
        done = {int(m.group(1)) for info in parts if (m := _SHARD_PART.fullmatch(info.base_name))} & set(
            range(n_shards)
        )
        for info in list(entries) + list(parts):  # leftovers of killed tasks: temporaries, tars without a part
            tar = _SHARD_TAR.fullmatch(info.base_name)
            if (
                info.base_name.endswith(".tmp")
                or (tar and int(tar.group(1)) not in done)
                or info.base_name in (MANIFEST_FILE, STATS_FILE)
            ):
                fs.delete_file(info.path)
        _log(f"resuming {out_dir}: {len(done)} of {n_shards} shards already finished, writing {n_shards - len(done)}")
        return done
    if any(_ours(e.base_name) or e.base_name.endswith(".tmp") for e in entries) or parts:
        why = "items or settings changed" if plan else "it was not written by a resumable ingest"
        _log(f"{out_dir} holds a different ingest ({why}): starting over")
        for info in entries:
            if _ours(info.base_name) or info.base_name.endswith(".tmp"):
                fs.delete_file(info.path)
        if parts:
            fs.delete_dir(parts_dir)
    write_atomic(
        fs, posixpath.join(base, PLAN_FILE), json.dumps({"fingerprint": fingerprint, "shards": n_shards}).encode()
    )
    return set()


def _read_parts(fs, base: str, n_shards: int):
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for index in range(n_shards):
        with fs.open_input_file(posixpath.join(base, _part_name(index))) as fh:
            frames.append(pq.read_table(fh).to_pandas())
    if not frames:
        return pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _annotation_counts(keyed: list[dict], kept: set[str]) -> dict[str, int]:
    """Sum of the per-item `counts` (boxes kept/dropped by reason, frames with an action, ...) over kept samples."""
    totals: dict[str, int] = {}
    for item in keyed:
        if item["key"] in kept:
            for name, value in (item.get("counts") or {}).items():
                totals[name] = totals.get(name, 0) + int(value)
    return dict(sorted(totals.items()))


def _stream_with_progress(ds, source: str, total: int, already: int) -> None:
    """Run the shard writers, counting their manifest rows (kept / skipped) into a progress bar as
    each shard finishes; the rows also sit in the parts, so nothing here needs to keep them."""
    kept = skipped = 0
    with console.progress(f"ingest {source}", total=total, unit="img", initial=already) as bar:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ok = sum(1 for status in block.column("status").to_pylist() if status == OK)
            kept, skipped = kept + ok, skipped + block.num_rows - ok
            bar.update(block.num_rows, kept=kept, skipped=skipped)


def write_shards(items: list[dict[str, Any]], out_dir: str, source: str, cfg: IngestConfig) -> dict[str, Any]:
    """Ingest `items` into `out_dir`; returns the stats dict (also written to `_stats.json`).

    An item: {input, id, labels?, captions?, boxes? (pixel xyxy), box_frame? [w, h], video?, frame?,
    action?, loader? (file|tar|video), member?, frame_index?, skip? [reason, detail], counts?}.
    Re-running with the same items resumes (finished shards are kept); with other items the folder's
    previous shard set is replaced.
    """
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    check_access(out_dir, write=True)  # bad credentials or no bucket: one line, before any task starts
    fs, base = filesystem(out_dir)
    per_shard = max(1, cfg.samples_per_shard)
    keyed = [{**item, "key": f"{i:09d}"} for i, item in enumerate(items)]
    groups = [json.dumps(keyed[i : i + per_shard]) for i in range(0, len(keyed), per_shard)]
    try:
        done = _prepare_out_dir(fs, base, out_dir, _fingerprint(groups, source, cfg), len(groups))
    except OSError as exc:
        raise explain(exc, out_dir, "preparing the shard folder") or exc from None
    todo = [{"shard_index": s, "items_json": text} for s, text in enumerate(groups) if s not in done]
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.flat_map(
            _write_one_shard, fn_kwargs={"out_dir": out_dir, "source": source, "cfg_dict": dataclasses.asdict(cfg)}
        )
        try:
            _stream_with_progress(ds, source, len(keyed), sum(min(per_shard, len(keyed) - s * per_shard) for s in done))
        except Exception as exc:
            error = explain(exc, out_dir, "writing shards")
            if error is None:
                raise
            raise StorageError(f"{error}; finished shards are kept: re-run the same command to resume") from None
    try:
        manifest = _read_parts(fs, base, len(groups)).sort_values("key").reset_index(drop=True)
        with fs.open_output_stream(posixpath.join(base, MANIFEST_FILE)) as stream:
            pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), stream)
    except OSError as exc:
        raise explain(exc, out_dir, "writing the manifest") or exc from None

    found = manifest["status"].value_counts().to_dict()
    order = [s for s in STATUSES if s in found] + sorted(s for s in found if s not in STATUSES)
    counts = {OK: int(found.get(OK, 0))} | {s: int(found[s]) for s in order if s != OK}
    labels = sorted({label for item in items for label in item.get("labels", [])})
    stats = {
        "source": source,
        "total": len(items),
        "counts": counts,
        "shards": sorted(s for s in manifest["shard"].unique() if s),
        "labels": labels,
        "max_side": cfg.max_side,
    }
    annotations = _annotation_counts(keyed, set(manifest.loc[manifest["status"] == OK, "key"]))
    if annotations:
        stats["annotations"] = annotations
    with fs.open_output_stream(posixpath.join(base, STATS_FILE)) as stream:
        stream.write(json.dumps(stats, indent=1).encode())
    return stats


def load_stats(shard_dir: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(posixpath.join(str(shard_dir), STATS_FILE)))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {STATS_FILE} in {shard_dir}: run `abpipe ingest` first (or check data.shards)"
        ) from None
    except OSError as exc:
        raise explain(exc, shard_dir, f"reading {STATS_FILE}") or exc from None


def load_manifest(shard_dir: str):
    import pyarrow.parquet as pq

    fs, base = filesystem(str(shard_dir))
    with fs.open_input_file(posixpath.join(base, MANIFEST_FILE)) as fh:
        return pq.read_table(fh).to_pandas()


def read_shards(
    shard_dir: str,
    shuffle: str | None = None,
    num_cpus: float | None = None,
    passes: int = 1,
    concurrency: int | None = None,
    seed: int = 0,
):
    """Ray Dataset of the kept samples: columns `__key__` (str), `jpg` (bytes), `json` (bytes), `__url__`.

    Columns are left as WebDataset names: a rename/select would add a separate Ray Data operator
    (and CPU slot) in front of the crop actors for no gain. The shards are read through the same
    filesystem the ingest wrote them with (local, pyarrow URI or fsspec).

    One block per tar file: with fewer files than its default read parallelism, Ray Data splits
    every file's block into a few odd-sized pieces (e.g. 375 rows -> 4 x ~94), each of which the
    crop stage then cuts into a full batch plus a remainder, and the trainer's iterator copies
    those remainders back together. Whole files give one short batch per shard, not per piece
    (bench_crop_stage, M = 4: steady 369 -> 428 images/s, the driver's CPU per image halved).

    `passes` > 1 lists the files that many times in ONE read operator (`shuffle="files"`: each pass
    in its own order, seeded by (`seed`, pass)), so `concurrency` can cap the read tasks of the
    whole stream. Every concurrent read task is a worker process that starts (Python, Ray, Arrow:
    ~2 CPU-s) when an execution starts, on the same cores as the crop actors' own start-up: a union
    of per-pass reads runs several at once whatever each one's cap. On 2 cores, 16 passes: first
    batch after 10.4-12.3 s as a union, 4.6-5.6 s as one read at concurrency 1 (ad hoc, 2026-11-23).
    """
    import ray.data

    if shuffle not in (None, "files"):
        raise ValueError(f"shuffle must be None or 'files', got {shuffle!r}")
    stats = load_stats(shard_dir)
    if not stats["shards"]:
        raise ValueError(f"{shard_dir} holds no usable samples (counts: {stats['counts']})")
    fs, base = filesystem(str(shard_dir))
    paths = [posixpath.join(base, name) for name in stats["shards"]]
    order = []
    for index in range(max(1, passes)):
        perm = np.random.default_rng([seed, index]).permutation(len(paths)) if shuffle else range(len(paths))
        order += [paths[i] for i in perm]
    return ray.data.read_webdataset(
        order, filesystem=fs, decoder=None, num_cpus=num_cpus, override_num_blocks=len(order), concurrency=concurrency
    )
