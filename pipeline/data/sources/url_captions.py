"""`ingest.source: cc12m` (alias `urls`): any url+caption list -> our shard set, downloaded by img2dataset.

Every step can be cut short and re-run with the same command:
1. read the list, refuse what must not be fetched (`bad_url`), and write the fetchable rows with their
   keys once, as `_img2dataset_input.parquet`; `_url_ingest.json` pins the input and the settings that
   shape the shards, so a re-run can never mix two different lists into one shard set;
2. img2dataset downloads into `_img2dataset/` in incremental mode: finished shards are not fetched again;
3. each finished img2dataset shard is normalised as soon as it appears (threads, while the download
   goes on) into `shard-<id>.tar` + `_parts/shard-<id>.parquet`; a shard with a part is never redone;
4. `manifest.parquet` (one row per listed URL) and `_stats.json` are rebuilt from the parts, the refused
   rows and the rows of shards that did not finish (`incomplete`: the next run fetches them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline import console
from pipeline.config import ConfigError, IngestConfig, RayConfig
from pipeline.data.schema import INCOMPLETE, MANIFEST_COLUMNS, OK, STATUSES
from pipeline.data.sources.img2dataset_shards import (
    PARTS_DIR,
    RAW_STATS_SUFFIX,
    finished_raw_shards,
    normalise_shard,
    normalised_shards,
    part_path,
)
from pipeline.data.sources.url_list import UrlList, read_url_list

STATE_FILE = "_url_ingest.json"
INPUT_FILE = "_img2dataset_input.parquet"
RAW_DIR = "_img2dataset"
DISTRIBUTORS = ("multiprocessing", "ray")
POLL_SECONDS = 0.5


def _join(uri: str, name: str) -> str:
    """A child of a local folder (made absolute: img2dataset's workers need it) or of a URI."""
    return f"{uri.rstrip('/')}/{name}" if "://" in uri else os.path.join(os.path.abspath(uri), name)


def _validate(ing: IngestConfig) -> None:
    cc = ing.cc12m
    if cc.distributor not in DISTRIBUTORS:
        raise ConfigError(f"ingest.cc12m.distributor must be one of {DISTRIBUTORS}, got {cc.distributor!r}")
    for key, value, low in (
        ("processes", cc.processes, 1),
        ("threads", cc.threads, 1),
        ("retries", cc.retries, 0),
        ("max_shard_retry", cc.max_shard_retry, 0),
    ):
        if value < low:
            raise ConfigError(f"ingest.cc12m.{key} must be >= {low}, got {value}")
    if cc.timeout <= 0:
        raise ConfigError(f"ingest.cc12m.timeout must be > 0 seconds, got {cc.timeout}")
    if ing.samples_per_shard < 1:
        raise ConfigError(f"ingest.samples_per_shard must be >= 1, got {ing.samples_per_shard}")
    if "://" in ing.output:  # img2dataset writes through fsspec: fail now, not in its workers
        import fsspec

        try:
            fsspec.get_filesystem_class(ing.output.split("://", 1)[0])
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"ingest.output {ing.output}: img2dataset cannot write there through fsspec ({exc})"
            ) from None


def _fingerprint(listing: UrlList, ing: IngestConfig, source: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    for key, url, caption in zip(listing.keys, listing.urls, listing.captions):
        digest.update(f"{key}\t{url}\t{caption}\n".encode())
    for row in listing.refused:
        digest.update(f"{row['key']}\t{row['input']}\n".encode())
    shaping = {k: getattr(ing, k) for k in ("samples_per_shard", "max_side", "min_side", "jpeg_quality")}
    return {"source": source, "input": ing.input, "input_sha256": digest.hexdigest(), "total": listing.total, **shaping}


def _prepare(listing: UrlList, ing: IngestConfig, source: str) -> None:
    """Pin the input (or check it is the one this folder was started with) and write img2dataset's list."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipeline.data.shards import MANIFEST_FILE, STATS_FILE, filesystem

    fs, base = filesystem(ing.output)
    fs.create_dir(base, recursive=True)
    wanted = _fingerprint(listing, ing, source)
    state_path = posixpath.join(base, STATE_FILE)
    if fs.get_file_info(state_path).type == pafs.FileType.File:
        with fs.open_input_stream(state_path) as stream:
            started = json.loads(stream.read())
        differs = sorted(k for k in wanted if k != "input" and started.get(k) != wanted[k])
        if differs:
            raise ConfigError(
                f"ingest.output {ing.output} holds a URL ingest started with a different {', '.join(differs)} "
                f"({', '.join(f'{k}: {started.get(k)!r} now {wanted[k]!r}' for k in differs if k != 'input_sha256')}); "
                "re-run with the original input and settings to resume, or use a new ingest.output"
            )
    else:  # a fresh start: anything here is a previous shard set, replaced (as write_shards does)
        for info in fs.get_file_info(pafs.FileSelector(base)):
            if info.base_name.startswith("shard-") or info.base_name in (MANIFEST_FILE, STATS_FILE, INPUT_FILE):
                fs.delete_file(info.path)
            elif info.base_name in (PARTS_DIR, RAW_DIR) and info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
    input_path = posixpath.join(base, INPUT_FILE)
    if fs.get_file_info(input_path).type != pafs.FileType.File:
        table = pa.table(
            {"abpipe_key": listing.keys, "url": listing.urls, "caption": listing.captions},
            schema=pa.schema([("abpipe_key", pa.string()), ("url", pa.string()), ("caption", pa.string())]),
        )
        with fs.open_output_stream(input_path + ".tmp") as stream:
            pq.write_table(table, stream)
        fs.move(input_path + ".tmp", input_path)
    with fs.open_output_stream(state_path) as stream:
        stream.write(json.dumps(wanted, indent=1).encode())


class _Normaliser:
    """Normalises img2dataset shards as they finish, on a few threads, while the download goes on."""

    def __init__(self, raw_dir: str, ing: IngestConfig, source: str, digits: int, wanted: set[int], bar=None):
        self.raw_dir, self.ing, self.source, self.digits, self.wanted = raw_dir, ing, source, digits, wanted
        self.bar, self.kept, self.skipped, self.lock = bar, 0, 0, threading.Lock()
        self.done = normalised_shards(ing.output)
        self.futures: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, ing.cc12m.processes))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="abpipe-normalise", daemon=True)

    def _submit_finished(self) -> None:
        for shard_id in sorted((finished_raw_shards(self.raw_dir) & self.wanted) - self.done - set(self.futures)):
            self.futures[shard_id] = self.pool.submit(self._normalise, shard_id)

    def _normalise(self, shard_id: int) -> None:
        rows = normalise_shard(shard_id, self.raw_dir, self.ing.output, self.source, self.ing, self.digits)
        kept = sum(r["status"] == OK for r in rows)
        with self.lock:
            self.kept, self.skipped = self.kept + kept, self.skipped + len(rows) - kept
            if self.bar is not None:
                self.bar.update(len(rows), kept=self.kept, skipped=self.skipped)

    def _watch(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            try:
                self._submit_finished()
            except Exception as exc:  # a listing hiccup: the final pass catches up
                console.warn(f"listing {self.raw_dir} failed ({exc}); retrying")

    def __enter__(self) -> "_Normaliser":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def finish(self) -> dict[int, str]:
        """Normalise whatever is left; returns {shard id: error} for shards that could not be read."""
        from pipeline.data.shards import filesystem

        self._submit_finished()
        failures = {}
        for shard_id, future in sorted(self.futures.items()):
            try:
                future.result()
            except Exception as exc:  # an unreadable raw shard: forget it so the next run fetches it again
                failures[shard_id] = (
                    f"img2dataset shard {shard_id} unreadable ({type(exc).__name__}: {exc}); re-run to fetch it again"[
                        :500
                    ]
                )
                fs, raw_base = filesystem(self.raw_dir)
                fs.delete_file(posixpath.join(raw_base, f"{shard_id:0{self.digits}d}{RAW_STATS_SUFFIX}"))
                console.warn(failures[shard_id])
        self.pool.shutdown()
        return failures


def _collect_manifest(listing: UrlList, ing: IngestConfig, source: str, num_shards: int, failures: dict[int, str]):
    """Parts + refused rows + rows of unfinished shards: one row per listed URL, sorted by key."""
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.data.shards import filesystem

    fs, base = filesystem(ing.output)
    frames = []
    for shard_id in sorted(normalised_shards(ing.output) & set(range(num_shards))):
        with fs.open_input_file(part_path(base, shard_id)) as fh:
            frames.append(pq.read_table(fh).to_pandas())
    covered = set(pd.concat(frames)["key"]) if frames else set()
    per_shard = ing.samples_per_shard
    missing = []
    for index, (key, url) in enumerate(zip(listing.keys, listing.urls)):
        if key not in covered:
            shard_id = index // per_shard
            detail = failures.get(
                shard_id, f"img2dataset did not finish download shard {shard_id}; re-run the same command to fetch it"
            )
            missing.append(
                {"key": key, "shard": "", "source": source, "status": INCOMPLETE, "detail": detail, "input": url}
            )
    extra = [{**row, "shard": "", "source": source} for row in listing.refused] + missing
    frames.append(pd.DataFrame(extra, columns=list(MANIFEST_COLUMNS)))
    manifest = pd.concat(frames, ignore_index=True)[list(MANIFEST_COLUMNS)]
    return manifest.sort_values("key").reset_index(drop=True)


def _img2dataset_log(output: str) -> str:
    """img2dataset's own prints (per-shard stats, its shard bar) go to a file beside the shards (or, for
    a remote output, in the temp dir) unless --verbose: abpipe's bar already shows the progress."""
    if "://" in output:
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"abpipe-img2dataset-{os.getpid()}.log")
    os.makedirs(output, exist_ok=True)
    return os.path.join(os.path.abspath(output), "_img2dataset.log")


def ingest_url_captions(ing: IngestConfig, ray_cfg: RayConfig | None = None, source: str = "cc12m") -> dict[str, Any]:
    """Download + normalise `ing.input` into `ing.output`; resumes where a previous run stopped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import MANIFEST_FILE, STATS_FILE, filesystem

    _validate(ing)
    started = time.perf_counter()
    listing = read_url_list(ing.input, ing.cc12m)
    _prepare(listing, ing, source)
    num_shards = math.ceil(len(listing.keys) / ing.samples_per_shard)
    wanted = set(range(num_shards))
    raw_dir = _join(ing.output, RAW_DIR)
    from pipeline.data.sources.img2dataset_runner import download, shard_digits  # imports OpenCV: only when needed

    digits = shard_digits(num_shards)
    per_shard = ing.samples_per_shard
    normaliser = _Normaliser(raw_dir, ing, source, digits, wanted)
    to_fetch = wanted - normaliser.done - finished_raw_shards(raw_dir)
    console.note(
        f"{source}: {listing.total} listed, {len(listing.refused)} refused, "
        f"{num_shards} download shards, {len(to_fetch)} to fetch"
    )
    initial = sum(min(per_shard, len(listing.keys) - i * per_shard) for i in normaliser.done & wanted)
    with console.progress(f"ingest {source}", total=len(listing.keys), unit="img", initial=initial) as bar:
        normaliser.bar = bar
        if to_fetch:
            if ing.cc12m.distributor == "ray":
                from pipeline.runtime import init_ray

                init_ray(ray_cfg)
            log = _img2dataset_log(ing.output)
            if not console.verbose():
                console.note(f"img2dataset's own output: {log}")
            with normaliser, console.captured(log):
                download(_join(ing.output, INPUT_FILE), raw_dir, ing, num_shards)
        failures = normaliser.finish()

    manifest = _collect_manifest(listing, ing, source, num_shards, failures)
    fs, base = filesystem(ing.output)
    with fs.open_output_stream(posixpath.join(base, MANIFEST_FILE)) as stream:
        pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), stream)
    counts = {status: int((manifest["status"] == status).sum()) for status in STATUSES}
    stats = {
        "source": source,
        "total": listing.total,
        "counts": {k: v for k, v in counts.items() if v or k == OK},
        "shards": sorted(s for s in manifest["shard"].unique() if s),
        "labels": [],
        "max_side": ing.max_side,
        "seconds": round(time.perf_counter() - started, 3),
    }
    with fs.open_output_stream(posixpath.join(base, STATS_FILE)) as stream:
        stream.write(json.dumps(stats, indent=1).encode())
    return stats
