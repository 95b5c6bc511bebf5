"""Turn one finished img2dataset shard (its tar + parquet of per-URL statuses) into one of our shards.

img2dataset names its outputs `<id>.tar`, `<id>.parquet`, `<id>_stats.json`, and writes the stats
file last, so its presence means the shard is complete. Shard `<id>` becomes our `shard-<id>.tar`
(our keys, our `json` schema, `txt` caption) plus `_parts/shard-<id>.parquet`, its manifest rows,
written last: a shard with a part is done and never redone, so a re-run adds no duplicates.
Every kept image is re-validated with our decoder (`encode_sample`); every failed URL gets a reason.
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any

from pipeline.config import IngestConfig
from pipeline.data.schema import (
    BAD_URL,
    CORRUPT,
    DOWNLOAD_FAILED,
    MANIFEST_COLUMNS,
    OK,
    OPTED_OUT,
    SKIP_REASONS,
    TIMEOUT,
    TOO_LARGE,
    TOO_SMALL,
    BadImage,
    SampleMeta,
)

GUARD_PREFIX = "abpipe "  # our download guard's error messages: "abpipe <skip reason>: <detail>"
PARTS_DIR = "_parts"
RAW_STATS_SUFFIX = "_stats.json"


def skip_reason(status: str, error: str | None) -> str:
    """Map img2dataset's status + error message to one of our skip reasons."""
    message = (error or "").strip()
    if message.startswith(GUARD_PREFIX):
        reason = message[len(GUARD_PREFIX) :].split(":", 1)[0]
        return reason if reason in SKIP_REASONS else CORRUPT
    low = message.lower()
    if "x-robots-tag" in low:
        return OPTED_OUT
    if "timed out" in low or "timeout" in low:
        return TIMEOUT
    if "unknown url type" in low:
        return BAD_URL
    if low == "image too small":
        return TOO_SMALL
    if low == "image area too large":
        return TOO_LARGE
    if status == "failed_to_download":
        return DOWNLOAD_FAILED
    return CORRUPT  # failed_to_resize: OpenCV could not decode what Pillow accepted


def finished_raw_shards(raw_dir: str) -> set[int]:
    """Ids of the img2dataset shards whose stats file exists (i.e. complete)."""
    import pyarrow.fs as pafs

    from pipeline.data.shards import filesystem

    fs, base = filesystem(raw_dir)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return set()
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(base))]
    return {
        int(n[: -len(RAW_STATS_SUFFIX)])
        for n in names
        if n.endswith(RAW_STATS_SUFFIX) and n[: -len(RAW_STATS_SUFFIX)].isdigit()
    }


def part_path(out_dir: str, shard_id: int) -> str:
    from pipeline.data.shards import shard_name

    return posixpath.join(out_dir, PARTS_DIR, shard_name(shard_id).replace(".tar", ".parquet"))


def normalised_shards(out_dir: str) -> set[int]:
    """Ids of the shards whose manifest part exists (normalised, never redone)."""
    import pyarrow.fs as pafs

    from pipeline.data.shards import filesystem

    fs, base = filesystem(out_dir)
    parts = posixpath.join(base, PARTS_DIR)
    if fs.get_file_info(parts).type == pafs.FileType.NotFound:
        return set()
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(parts))]
    return {
        int(n[len("shard-") : -len(".parquet")]) for n in names if n.startswith("shard-") and n.endswith(".parquet")
    }


def _read_raw_images(fs, tar_path: str) -> dict[str, bytes]:
    """img2dataset key -> jpg bytes (its txt/json members are not needed: the parquet has them)."""
    images = {}
    with fs.open_input_stream(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                images[posixpath.basename(member.name)[: -len(".jpg")]] = tar.extractfile(member).read()
    return images


def normalise_shard(
    shard_id: int, raw_dir: str, out_dir: str, source: str, ing: IngestConfig, digits: int
) -> list[dict[str, Any]]:
    """Write our shard + manifest part for img2dataset shard `shard_id`; returns its manifest rows."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from pipeline.data.shards import encode_sample, filesystem, shard_name

    raw_fs, raw_base = filesystem(raw_dir)
    raw_name = f"{shard_id:0{digits}d}"
    with raw_fs.open_input_file(posixpath.join(raw_base, raw_name + ".parquet")) as fh:
        statuses = pq.read_table(
            fh, columns=["abpipe_key", "url", "caption", "key", "status", "error_message"]
        ).to_pylist()
    raw_tar = posixpath.join(raw_base, raw_name + ".tar")
    images = _read_raw_images(raw_fs, raw_tar)

    fs, base = filesystem(out_dir)
    fs.create_dir(posixpath.join(base, PARTS_DIR), recursive=True)
    name = shard_name(shard_id)
    tmp_tar = posixpath.join(base, name + ".tmp")
    rows, written = [], 0
    with fs.open_output_stream(tmp_tar) as stream:
        writer = wds.TarWriter(stream)
        for raw in sorted(statuses, key=lambda r: r["abpipe_key"]):
            entry = {
                "key": raw["abpipe_key"],
                "shard": "",
                "source": source,
                "status": OK,
                "detail": "",
                "input": raw["url"],
            }
            if raw["status"] != "success":
                entry.update(
                    status=skip_reason(raw["status"], raw["error_message"]), detail=(raw["error_message"] or "")[:500]
                )
            elif raw["key"] not in images:
                entry.update(status=CORRUPT, detail="img2dataset reported success but its tar has no image")
            else:
                try:
                    jpg, width, height = encode_sample(images[raw["key"]], ing)
                except BadImage as exc:
                    entry.update(status=exc.reason, detail=exc.detail[:500])
                else:
                    captions = [raw["caption"]] if raw["caption"] else []
                    meta = SampleMeta(source=source, id=raw["url"], width=width, height=height, captions=captions)
                    sample = {"__key__": entry["key"], "jpg": jpg, "json": meta.to_json()}
                    if captions:
                        sample["txt"] = captions[0].encode()
                    writer.write(sample)
                    written += 1
                    entry["shard"] = name
            rows.append(entry)
        writer.close()
    if written:
        fs.move(tmp_tar, posixpath.join(base, name))
    else:
        fs.delete_file(tmp_tar)
    part = pa.Table.from_pandas(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), preserve_index=False)
    target = part_path(base, shard_id)
    with fs.open_output_stream(target + ".tmp") as stream:
        pq.write_table(part, stream)
    fs.move(target + ".tmp", target)
    if not ing.cc12m.keep_raw:
        raw_fs.delete_file(raw_tar)  # its parquet + stats stay: img2dataset's record that the shard is done
    return rows
