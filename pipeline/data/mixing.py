"""Weighted mixtures of shard sets as one Ray Dataset (e.g. 50% ImageNet + 50% COCO for DINO's
mixture baseline in Fig. 3 of the AB paper).

One pass ("epoch") of a mixture has as many samples as its sources together; source i contributes
weight_i / sum(weights) of them: sources below their natural share are subsampled, sources above it
are repeated whole and topped up with a sample. The sample is per row, seeded by (seed, pass, source,
copy, file) (pipeline/data/passes.py): every pass draws a different subset, and the same one
whenever it runs; expected counts are exact, realised counts vary by ~sqrt(n).
"""

from __future__ import annotations

import math

from pipeline.config import ConfigError


def mixture_counts(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """Expected samples per source in one pass of the mixture."""
    if not weights:
        raise ConfigError("a mixture needs at least one {shard dir: weight} entry")
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad or sum(weights.values()) <= 0:
        raise ConfigError(f"mixture weights must be >= 0 and not all 0, got {weights}")
    total = sum(sizes[k] for k in weights)
    norm = sum(weights.values())
    return {k: total * w / norm for k, w in weights.items()}


def stream_size(shards: str, mixture: dict[str, float]) -> int:
    """Samples in one pass of a stream (a mixture's pass is its sources' total)."""
    from pipeline.data.shards import load_stats

    paths = list(mixture) if mixture else [shards]
    return sum(int(load_stats(p)["counts"].get("ok", 0)) for p in paths)


def passes_needed(images_needed: int, pass_size: int, max_passes: int) -> int:
    """Passes one execution should stream to cover `images_needed`, plus one for skips and the
    last partial batch of each worker; at least 1, at most `max_passes`."""
    if pass_size <= 0:
        return 1
    return max(1, min(max_passes, -(-images_needed // pass_size) + 1))


ACTORS_PER_READ_TASK = 8  # one read task streams ~3,300 images/s (2-core bench), a crop actor ~250


def default_read_concurrency(crop_actors: int) -> int:
    """Concurrent shard-read tasks for `crop_actors` crop actors, with ~2x headroom on local disk
    (object storage reads slower per task: raise `data.read_concurrency` there)."""
    return max(1, math.ceil(crop_actors / ACTORS_PER_READ_TASK))


def stream_dataset(
    shards: str,
    mixture: dict[str, float],
    read_cpus: float | None = None,
    passes: int = 1,
    read_concurrency: int | None = None,
    seed: int = 0,
    stream: str = "train",
    resume: str | None = None,
):
    """One training stream: a mixture when given, else the single shard set, `passes` times over.

    Several passes in one dataset mean one execution, so the crop actors start once, not once per
    epoch. Every row carries its pass and its identity (pipeline/data/passes.py): the crop stage cuts
    a pass's crops from (seed, key, pass), and a resumed run skips the rows it has trained on
    (`resume`: the run's ResumePoint actor). Each pass lists its shard files (a mixture: its sources'
    files, whole copies and a seeded fraction) in its own order seeded by (`seed`, pass); one read
    task per file, at most `read_concurrency` at once.
    """
    from pipeline.data.passes import stream_passes

    if read_concurrency is not None and read_concurrency < 1:
        raise ConfigError(
            f"data.read_concurrency must be >= 1 (or null: one per {ACTORS_PER_READ_TASK} crop actors), got "
            f"{read_concurrency}"
        )
    return stream_passes(
        mixture or shards, passes, seed, read_cpus=read_cpus, concurrency=read_concurrency, stream=stream, resume=resume
    )
