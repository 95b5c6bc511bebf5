"""The crop stage's per-run counter: one small named actor per run (skip counts and per-key epochs).

Kept apart from crop_stage.py so that the actor's own process imports only Ray: it is created at
the start of every execution, next to the crop actors, and importing the crop stage (PIL, the config,
the text annotations; torch and OpenCV only when a cropper is built) would add CPU to each start-up
for nothing it uses.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

STATS_NAMESPACE = "abpipe"


@ray.remote(num_cpus=0)
class CropStats:
    """Per-run counts by status ("ok" plus each skip reason) and per-key visit counts (epochs)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.visits: dict[str, int] = {}

    def record(self, counts: dict[str, int], keys: list[str]) -> list[int]:
        """Add a batch's counts; return each kept key's epoch (visits before this one)."""
        self.counts.update(counts)
        epochs = []
        for key in keys:
            seen = self.visits.get(key, 0)
            self.visits[key] = seen + 1
            epochs.append(seen)
        return epochs

    def get(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}


_DRIVER_HANDLES: dict[str, Any] = {}  # a non-detached named actor lives while its owner does


def crop_stats_actor(name: str):
    """Get or create the named stats actor.

    A non-detached actor dies with the process that created it, so `build_crop_dataset` creates it
    on the driver (and keeps the handle here): it then outlives the crop actors' pool.
    """
    handle = CropStats.options(name=name, namespace=STATS_NAMESPACE, get_if_exists=True).remote()
    _DRIVER_HANDLES[name] = handle
    return handle


def crop_stats(name: str = "crop-stats") -> dict[str, int]:
    """Counts so far by status: {"ok": n, "<skip reason>": n, ...} (reasons from schema.py)."""
    return ray.get(ray.get_actor(name, namespace=STATS_NAMESPACE).get.remote())
