"""On-disk feature cache: a checkpoint's frozen features of one task split are computed once.

Feature extraction is the expensive half of an evaluation (a ViT forward over every image); the
probes are cheap by comparison. A sweep re-evaluates with new probes, re-runs after a kill, and
every checkpoint of a run shares one random-init reference, so the cache key names exactly what the
features depend on and nothing else:

    model fingerprint (sha256 of the weights file, or of the random-init recipe), which weights
    (teacher/student), task, dataset root, split, the split's input list, image size, resize mode.

An entry is a folder `<cache_dir>/<task>/<split>/<key>/` of `.npy` arrays plus `meta.json`, written
last: a folder without `meta.json` (a killed writer) is a miss and gets overwritten. An entry that
holds tokens also serves a request for pooled features alone. Any URI pyarrow understands works as
`cache_dir` (local folders are memory-mapped on read).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.data.shards import filesystem

log = logging.getLogger("abpipe.eval.cache")

_META = "meta.json"
_ARRAYS = ("pooled", "tokens", "kept")


def digest(value: Any) -> str:
    """sha256 hex of a JSON-able value (sorted keys: the same value always hashes the same)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    model: str  # fingerprint of the weights
    weights: str  # teacher | student
    task: str
    root: str
    split: str
    inputs: str  # digest of the split's input paths, in order
    image_size: int
    resize: str

    @property
    def id(self) -> str:
        return digest(self.__dict__)[:32]


def make_key(
    model: str, weights: str, task: str, root: str, split: str, inputs: Sequence[str], image_size: int, resize: str
) -> CacheKey:
    return CacheKey(
        model,
        weights,
        task,
        os.path.abspath(root) if "://" not in root else root,
        split,
        digest(list(map(str, inputs))),
        int(image_size),
        resize,
    )


@dataclass
class CachedFeatures:
    pooled: np.ndarray  # float32 (N_kept, D)
    tokens: np.ndarray | None  # float16 (N_kept, T, D) or None
    kept: np.ndarray  # int64 indices into the split's inputs
    skipped: dict[str, int]


class FeatureCache:
    """get/put of CachedFeatures by CacheKey under one directory (or URI)."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = filesystem(root)

    def _dir(self, key: CacheKey) -> str:
        return f"{self.base}/{key.task}/{key.split}/{key.id}"

    def get(self, key: CacheKey, need_tokens: bool) -> CachedFeatures | None:
        """The entry, or None on a miss (absent, incomplete, lacking tokens, or unreadable)."""
        import pyarrow.fs as pafs

        folder = self._dir(key)
        if self.fs.get_file_info(f"{folder}/{_META}").type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(f"{folder}/{_META}") as fh:
                meta = json.loads(fh.read())
            if meta.get("key") != key.__dict__:
                raise ValueError(f"key mismatch in {folder}/{_META}")
            if need_tokens and not meta.get("has_tokens"):
                return None
            arrays = {name: self._load(f"{folder}/{name}.npy") for name in _ARRAYS if name != "tokens" or need_tokens}
        except Exception as exc:  # a damaged entry costs a re-extraction, never a failed eval
            log.warning("feature cache entry %s unreadable, re-extracting: %s", folder, exc)
            return None
        if len(arrays["pooled"]) != len(arrays["kept"]) or (
            need_tokens and len(arrays["tokens"]) != len(arrays["kept"])
        ):
            log.warning("feature cache entry %s has inconsistent row counts, re-extracting", folder)
            return None
        return CachedFeatures(arrays["pooled"], arrays.get("tokens"), arrays["kept"], dict(meta.get("skipped", {})))

    def put(self, key: CacheKey, features: CachedFeatures) -> str:
        folder = self._dir(key)
        self.fs.create_dir(folder, recursive=True)
        try:
            self.fs.delete_file(f"{folder}/{_META}")  # an overwritten entry is incomplete until the end
        except (FileNotFoundError, OSError):
            pass
        self._save(f"{folder}/pooled.npy", features.pooled)
        self._save(f"{folder}/kept.npy", features.kept)
        if features.tokens is not None:
            self._save(f"{folder}/tokens.npy", features.tokens)
        meta = {
            "key": key.__dict__,
            "has_tokens": features.tokens is not None,
            "skipped": features.skipped,
            "rows": len(features.kept),
            "created": time.time(),
        }
        with self.fs.open_output_stream(f"{folder}/{_META}") as fh:
            fh.write(json.dumps(meta, indent=1, sort_keys=True).encode())
        return folder

    def _save(self, path: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        with self.fs.open_output_stream(path) as fh:
            fh.write(buf.getvalue())

    def _load(self, path: str) -> np.ndarray:
        import pyarrow.fs as pafs

        if isinstance(self.fs, pafs.LocalFileSystem):
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with self.fs.open_input_file(path) as fh:
            return np.load(io.BytesIO(fh.read()), allow_pickle=False)
