"""Exact passes over a training stream: every row knows its pass and its identity.

A training stream is a list of *items*, one per (pass, source, copy, shard file), read by Ray tasks
(`read_items`) into WebDataset-style rows plus two int64 columns:

- `pass`: the pass the row belongs to (the crop stage seeds a row's crops with (seed, key, pass), so
  a pass cuts the same crops whenever and wherever it runs);
- `row`: the row's identity within a pass, `(source, copy, file, ordinal in the tar)` packed into 63
  bits (`row_id`), unique within a pass even when a mixture repeats a source.

The trainer keeps a `StreamLedger` of the (pass, row) pairs it has trained on; a checkpoint stores
the union over workers as sorted, merged intervals of row ids (a finished shard file is one
interval, so a pass costs about one interval per file). A resumed run (Ray Train's automatic restart
or a re-submission) drops those rows twice over: the read tasks skip them before anything is decoded
(they ask the run's `ResumePoint` actor, which the restored loop fills), and the trainer drops any that
still arrive. So each pass trains on its rows exactly once, whatever was in flight at the kill.

Each pass lists its items in a seeded order ((seed, pass): a mixture's sources interleave), and a
mixture's fractional source share is a seeded Bernoulli sample per (seed, pass, source, copy, file).
With Ray Data's `preserve_order` (`data.deterministic`), the rows then arrive in one order that a
resumed run continues exactly.
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any, Iterable

import numpy as np
import ray

ORDINAL_BITS, FILE_BITS, COPY_BITS, SOURCE_BITS = 20, 20, 8, 15
RESUME_NAMESPACE = "abpipe"
COLUMNS = ("__key__", "jpg", "json", "txt", "__url__")


def row_base(source: int, copy: int, file: int) -> int:
    """The id of a shard file's first row; its rows are `row_base(...) + ordinal`."""
    if not (0 <= source < 1 << SOURCE_BITS and 0 <= copy < 1 << COPY_BITS and 0 <= file < 1 << FILE_BITS):
        raise ValueError(f"row id out of range: source {source}, copy {copy}, file {file}")
    return ((source << COPY_BITS | copy) << FILE_BITS | file) << ORDINAL_BITS


def row_copy(rows: np.ndarray) -> np.ndarray:
    """The copy index packed into row ids (a mixture repeating a source whole): part of a crop's seed."""
    return (np.asarray(rows, np.int64) >> (ORDINAL_BITS + FILE_BITS)) & ((1 << COPY_BITS) - 1)


def _shard_counts(shard_dir: str) -> dict[str, int]:
    """Rows per shard file from the ingest manifest ({} when it cannot be read: files are then read
    to learn whether they are finished)."""
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from pipeline.data.shards import MANIFEST_FILE
        from pipeline.storage import filesystem

        fs, base = filesystem(str(shard_dir))
        with fs.open_input_file(posixpath.join(base, MANIFEST_FILE)) as fh:  # two columns, not the whole table
            table = pq.read_table(fh, columns=["shard", "status"])
    except Exception:  # noqa: BLE001 - an optimisation only
        return {}
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = ok.group_by("shard").aggregate([("status", "count")])
    return dict(zip(counts["shard"].to_pylist(), counts["status_count"].to_pylist()))


def pass_items(sources: dict[str, float] | str, passes: int, seed: int = 0) -> list[dict]:
    """The items of `passes` passes over one shard set (a str) or a weighted mixture ({dir: weight}).

    A mixture's pass holds as many rows as its sources together, source i contributing weight_i /
    sum(weights) of them: whole copies of the source, then a seeded fraction (pipeline/data/mixing.py).
    """
    from pipeline.data.mixing import mixture_counts
    from pipeline.data.shards import load_stats

    mixture = {sources: 1.0} if isinstance(sources, str) else dict(sources)
    stats = {path: load_stats(path) for path in mixture}
    sizes = {path: int(s["counts"].get("ok", 0)) for path, s in stats.items()}
    empty = [p for p, n in sizes.items() if n == 0 and mixture[p] > 0]
    if empty:
        from pipeline.config import ConfigError

        raise ConfigError(f"shard sets with no usable samples: {empty}")
    wanted = mixture_counts(sizes, mixture)
    per_pass: list[dict] = []
    for source, (path, want) in enumerate(wanted.items()):
        if want <= 0:
            continue
        counts = _shard_counts(path)
        whole, rest = divmod(want / sizes[path], 1.0)
        shares = [1.0] * int(whole) + ([rest] if rest > 1e-9 else [])
        for copy, fraction in enumerate(shares):
            for file, name in enumerate(stats[path]["shards"]):
                per_pass.append(
                    {
                        "root": path,
                        "name": name,
                        "source": source,
                        "copy": copy,
                        "file": file,
                        "fraction": fraction,
                        "rows": counts.get(name, -1),
                    }
                )
    items = []
    for index in range(max(1, passes)):
        order = np.random.default_rng([seed, index]).permutation(len(per_pass))
        items += [{**per_pass[i], "pass": index, "seed": seed} for i in order]
    return items


def _samples(stream) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a WebDataset tar, in file order (key = name up to its first dot)."""
    key, sample = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, name = posixpath.split(member.name)
            stem, _, ext = name.partition(".")
            this = posixpath.join(directory, stem)
            if key is not None and this != key:
                yield key, sample
                sample = {}
            key = this
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


def read_items(batch: dict[str, np.ndarray], stream: str = "train", resume: str | None = None) -> dict:
    """Ray Data map_batches function: the rows of a batch of items (one shard file each), minus the
    rows the run's ResumePoint says this generation has trained on."""
    from pipeline.storage import filesystem

    actor = None
    if resume:
        try:
            actor = ray.get_actor(resume, namespace=RESUME_NAMESPACE)
        except ValueError:
            actor = None
    out: dict[str, list] = {c: [] for c in (*COLUMNS, "pass", "row")}
    for i in range(len(batch["name"])):
        item = {k: batch[k][i] for k in batch}
        base = row_base(int(item["source"]), int(item["copy"]), int(item["file"]))
        done = np.zeros((0, 2), np.int64)
        if actor is not None:
            done = np.asarray(
                ray.get(actor.consumed.remote(stream, int(item["pass"]), base, base + (1 << ORDINAL_BITS)))
            )
            done = done.reshape(-1, 2)
        n = int(item["rows"])
        if n > 0 and float(item["fraction"]) >= 1.0 and covers(done, base, base + n):
            continue  # finished before the restart: not even read
        fs, root = filesystem(str(item["root"]))
        with fs.open_input_stream(posixpath.join(root, str(item["name"]))) as fh:
            samples = list(_samples(fh))
        keep = np.ones(len(samples), bool)
        if float(item["fraction"]) < 1.0:
            rng = np.random.default_rng(
                [int(item["seed"]), int(item["pass"]), int(item["source"]), int(item["copy"]), int(item["file"])]
            )
            keep &= rng.random(len(samples)) < float(item["fraction"])
        rows = base + np.arange(len(samples), dtype=np.int64)
        keep &= ~contains(done, rows)
        for ordinal in np.flatnonzero(keep):
            key, sample = samples[ordinal]
            out["__key__"].append(key)
            out["jpg"].append(sample.get("jpg"))
            out["json"].append(sample.get("json"))
            out["txt"].append(sample.get("txt"))
            out["__url__"].append(f"{str(item['root']).rstrip('/')}/{item['name']}")
            out["pass"].append(int(item["pass"]))
            out["row"].append(int(rows[ordinal]))
    result = {c: np.array(out[c], dtype=object) for c in COLUMNS}
    result["pass"] = np.array(out["pass"], np.int64)
    result["row"] = np.array(out["row"], np.int64)
    return result


def stream_passes(
    sources: dict[str, float] | str,
    passes: int,
    seed: int = 0,
    read_cpus: float | None = None,
    concurrency: int | None = None,
    stream: str = "train",
    resume: str | None = None,
):
    """The Ray Dataset of `passes` passes over `sources`: one shard file per read task, at most
    `concurrency` at once, with `pass` and `row` columns."""
    import ray.data

    items = pass_items(sources, passes, seed)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        read_items,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"stream": stream, "resume": resume},
        num_cpus=read_cpus,
        concurrency=concurrency,
    )


# ---------------------------------------------------------------- interval sets of row ids


def intervals(ids: np.ndarray) -> np.ndarray:
    """Sorted, merged half-open intervals (k, 2) covering the given ids."""
    ids = np.unique(np.asarray(ids, np.int64))
    if ids.size == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.r_[0, breaks]]
    ends = ids[np.r_[breaks - 1, ids.size - 1]] + 1
    return np.stack([starts, ends], axis=1)


def union(*sets: np.ndarray) -> np.ndarray:
    """The union of interval sets, merged (touching intervals join)."""
    parts = [np.asarray(s, np.int64).reshape(-1, 2) for s in sets]
    allv = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    if allv.shape[0] == 0:
        return allv
    allv = allv[np.argsort(allv[:, 0], kind="stable")]
    reach = np.maximum.accumulate(allv[:, 1])
    new = np.r_[True, allv[1:, 0] > reach[:-1]]
    group = np.cumsum(new) - 1
    starts = allv[new, 0]
    ends = np.zeros(starts.size, np.int64)
    np.maximum.at(ends, group, allv[:, 1])
    return np.stack([starts, ends], axis=1)


def contains(done: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which ids fall inside the interval set."""
    ids = np.asarray(ids, np.int64)
    done = np.asarray(done, np.int64).reshape(-1, 2)
    if done.shape[0] == 0:
        return np.zeros(ids.shape, bool)
    at = np.searchsorted(done[:, 0], ids, side="right") - 1
    return (at >= 0) & (ids < done[np.clip(at, 0, None), 1])


def covers(done: np.ndarray, lo: int, hi: int) -> bool:
    """Whether the interval set covers [lo, hi) whole."""
    inside = clip(done, lo, hi)
    return inside.shape[0] == 1 and inside[0, 0] == lo and inside[0, 1] == hi


def clip(done: np.ndarray, lo: int, hi: int) -> np.ndarray:
    done = np.asarray(done, np.int64).reshape(-1, 2)
    inside = done[(done[:, 1] > lo) & (done[:, 0] < hi)]
    return np.stack([np.maximum(inside[:, 0], lo), np.minimum(inside[:, 1], hi)], axis=1) if inside.size else inside


# ---------------------------------------------------------------- the ledger


class StreamLedger:
    """What one stream has trained on: {pass: intervals of row ids} in the current generation.

    A generation is one run through the stream's passes; the trainer starts a new one only if the
    stream runs dry before the budget (skips ate the spare pass) and reads it again.
    """

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.generation = int(state.get("generation", 0))
        self.done: dict[int, np.ndarray] = {
            int(p): np.asarray(v, np.int64).reshape(-1, 2) for p, v in state.get("passes", {}).items()
        }
        self.pending: dict[int, list[np.ndarray]] = {}
        self.dropped = 0  # rows that arrived although trained on (the read tasks had not skipped them)

    def new_generation(self) -> None:
        self.generation += 1
        self.done, self.pending = {}, {}

    def fresh(self, passes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Mask of the rows not yet trained on in this generation."""
        passes, rows = np.asarray(passes, np.int64), np.asarray(rows, np.int64)
        keep = np.ones(rows.shape, bool)
        for p in np.unique(passes):
            if int(p) in self.done:
                sel = passes == p
                keep[sel] = ~contains(self.done[int(p)], rows[sel])
        return keep

    def record(self, passes: np.ndarray, rows: np.ndarray) -> None:
        passes, rows = np.asarray(passes, np.int64), np.asarray(rows, np.int64)
        for p in np.unique(passes):
            self.pending.setdefault(int(p), []).append(rows[passes == p])

    def state(self) -> dict:
        """{"generation", "passes": {pass: [[start, end], ...]}}: plain lists (checkpoint- and JSON-safe)."""
        for p, chunks in self.pending.items():
            self.done[p] = union(self.done.get(p, np.zeros((0, 2), np.int64)), intervals(np.concatenate(chunks)))
        self.pending = {}
        return {"generation": self.generation, "passes": {p: v.tolist() for p, v in sorted(self.done.items())}}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """The union of several workers' states (all in one generation: they read one split stream)."""
        generation = max((int(s.get("generation", 0)) for s in states), default=0)
        passes: dict[int, list[np.ndarray]] = {}
        for s in states:
            if int(s.get("generation", 0)) == generation:
                for p, v in s.get("passes", {}).items():
                    passes.setdefault(int(p), []).append(np.asarray(v, np.int64).reshape(-1, 2))
        return {"generation": generation, "passes": {p: union(*v).tolist() for p, v in sorted(passes.items())}}

    def trained(self) -> int:
        """Rows recorded in this generation."""
        self.state()
        return int(sum((v[:, 1] - v[:, 0]).sum() for v in self.done.values()))


@ray.remote(num_cpus=0)
class ResumePoint:
    """Per run: each stream's trained-on rows at the checkpoint the loop restored, for the read tasks."""

    def __init__(self):
        self.streams: dict[str, dict[int, np.ndarray]] = {}

    def set(self, stream: str, state: dict) -> None:
        self.streams[stream] = {
            int(p): np.asarray(v, np.int64).reshape(-1, 2) for p, v in (state or {}).get("passes", {}).items()
        }

    def consumed(self, stream: str, pass_: int, lo: int, hi: int) -> list:
        done = self.streams.get(stream, {}).get(int(pass_))
        return [] if done is None else clip(done, lo, hi).tolist()


_HANDLES: dict[str, Any] = {}


def resume_point_actor(name: str):
    """Get or create the run's ResumePoint (on the driver, which keeps the handle: it outlives restarts)."""
    handle = ResumePoint.options(name=name, namespace=RESUME_NAMESPACE, get_if_exists=True).remote()
    _HANDLES[name] = handle
    return handle
