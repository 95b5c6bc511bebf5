"""The multi-view crop stage: Ray Data CPU actors turn shard samples into uint8 training views.

Each image is decoded once (at a reduced JPEG DCT scale when even the smallest crop would still
have enough pixels) and all views are cut from that one array. Samples that fail to decode are
dropped from the batch and counted by reason in a named `CropStats` actor, so a corrupt shard
member costs one counted skip, not a dead worker.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import Counter
from typing import Any

import numpy as np
import ray
from PIL import Image

from pipeline.config import ViewsConfig
from pipeline.data.schema import OK, BadImage, decode_rgb
from pipeline.data.views import make_views

STATS_NAMESPACE = "abpipe"


@ray.remote(num_cpus=0)
class CropStats:
    """Counts per status over every crop actor of one run ("ok" plus each skip reason)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


_DRIVER_HANDLES: dict[str, Any] = {}  # a named actor lives while a handle to it does


def crop_stats_actor(name: str):
    """Get or create the named counter; the driver keeps a handle so it outlives the dataset."""
    handle = CropStats.options(name=name, namespace=STATS_NAMESPACE, get_if_exists=True).remote()
    _DRIVER_HANDLES[name] = handle
    return handle


def crop_stats(name: str) -> dict[str, int]:
    return ray.get(ray.get_actor(name, namespace=STATS_NAMESPACE).get.remote())


def draft_size(cfg: ViewsConfig) -> int:
    """Smallest decoded side that keeps the smallest possible crop at >= view_size pixels."""
    min_scale = min(cfg.scale[0], cfg.annotation_scale[0] if cfg.annotation_views else 1.0)
    return int(math.ceil(cfg.view_size / math.sqrt(max(min_scale, 1e-6)) * max(cfg.ratio[1], 1 / cfg.ratio[0]) ** 0.5))


def _empty_batch(cfg: ViewsConfig) -> dict[str, np.ndarray]:
    s = cfg.view_size
    return {
        "views": np.zeros((0, cfg.num_views, s, s, 3), np.uint8),
        "boxes": np.zeros((0, cfg.num_views, 4), np.float32),
        "ann_views": np.zeros((0, cfg.annotation_views, s, s, 3), np.uint8),
    }


class MultiViewCropper:
    """Callable class for `map_batches`: shard rows {__key__, jpg, json} -> {views, boxes, ann_views}.

    Only numeric columns leave the stage: that is what the trainer's torch iterator can carry.
    """

    def __init__(self, views_cfg: dict[str, Any], seed: int = 0, stats_name: str | None = None):
        self.cfg = ViewsConfig(**views_cfg)
        self.seed = seed
        self.draft = draft_size(self.cfg)
        self.calls = 0
        self.stats = crop_stats_actor(stats_name) if stats_name else None

    def rng_for(self, key: str) -> np.random.Generator:
        """Per-sample stream: seeded by the run seed and the sample key, fresh on every visit."""
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), self.calls])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        counts: Counter = Counter()
        out: dict[str, list] = {"views": [], "boxes": [], "ann_views": []}
        for key, jpg in zip(batch["__key__"], batch["jpg"]):
            try:
                rgb = decode_rgb(bytes(jpg), draft_to=self.draft)
            except BadImage as exc:
                counts[exc.reason] += 1
                continue
            views = make_views(Image.fromarray(rgb), self.rng_for(str(key)), self.cfg)
            for name in out:
                out[name].append(views[name])
            counts[OK] += 1
        if self.stats is not None:
            self.stats.add.remote(dict(counts))
        if not out["views"]:
            return _empty_batch(self.cfg)
        return {name: np.stack(values) for name, values in out.items()}


def build_crop_dataset(ds, cfg: ViewsConfig, seed: int = 0, stats_name: str | None = "crop-stats"):
    """Apply the crop stage to a shard dataset (`read_shards` columns); lazy and streaming."""
    if stats_name:
        crop_stats_actor(stats_name)
    size = cfg.concurrency or max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    return ds.map_batches(
        MultiViewCropper,
        fn_constructor_kwargs={"views_cfg": dataclasses.asdict(cfg), "seed": seed, "stats_name": stats_name},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
        num_cpus=cfg.cpus_per_actor,
    )
