"""The multi-view crop stage: Ray Data CPU actors turn shard samples into uint8 training views.

Each image is decoded once (at a reduced JPEG DCT scale when even the smallest crop would still
have >= view_size pixels) and all views are cut from that one array. Samples that fail to decode
are dropped from the batch and counted by reason, so a corrupt shard member costs one counted
skip, not a dead worker.

A training stream's rows carry their pass (pipeline/data/passes.py): a row's crops are seeded by
(seed, key, pass), whatever ran before. Other streams (the preview, tests) count epochs instead.
Counting (and those epochs) share one named `CropStats` actor per run (crop_stats.py), reached with ONE
synchronous call per batch (not per image):
- counts are recorded before the batch leaves the stage, so `crop_stats(name)` read after the
  dataset is consumed is exact (a fire-and-forget call from an actor Ray Data is tearing down could
  still be in flight, or lost);
- it returns how many times each key was seen before: the key's epoch. Ray Data builds a fresh
  actor pool every time a dataset is executed (every epoch), and a key may land on any actor, so a
  counter inside the crop actor would restart at 0 each epoch and repeat the same crops. Seeding
  with (seed, key, epoch-of-key) makes runs reproducible and epochs different, whatever the
  scheduling. The actor keeps one int per distinct key (fine up to tens of millions of images).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections import Counter
from typing import Any

import numpy as np
import ray

from pipeline.config import ConfigError, ViewsConfig, section_from_dict
from pipeline.data.crop_stats import crop_stats, crop_stats_actor  # noqa: F401 - crop_stats is this stage's read-out
from pipeline.data.passes import row_copy
from pipeline.data.schema import CORRUPT, OK, BadImage, decode_rgb
from pipeline.data.text_annotations import MissingAnnotation, annotation_texts, check_text_config, pick

# torch and the view maker (torch, OpenCV) are imported by the cropper itself, not here: a Ray Dataset's
# plan holds the MultiViewCropper class, so every process that unpickles the plan imports this module
# (Ray Train's DatasetManager and SplitCoordinator, for a training run), and none of them crops anything.


def draft_size(cfg: ViewsConfig) -> int:
    """Decoded short side that keeps the smallest possible crop's short side >= view_size.

    A crop of area fraction a and aspect r in an image whose short side is N has short side
    >= N * sqrt(a / max(r, 1/r)), so N >= S * sqrt(max(r, 1/r) / a_min). PIL's draft picks the
    largest DCT reduction (1/2, 1/4, 1/8) that keeps both sides >= N, so nothing below is upsampled.
    """
    scales = [cfg.scale[0]] if cfg.num_views else []
    if cfg.annotation_views:
        scales.append(cfg.annotation_scale[0])
    a_min = max(min(scales, default=1.0), 1e-6)
    r_max = max(cfg.ratio[1], 1 / cfg.ratio[0])
    # DINO local crops
    local = cfg.local_size * math.sqrt(r_max / max(cfg.local_scale[0], 1e-6)) if cfg.local_views else 0
    return math.ceil(max(cfg.view_size * math.sqrt(r_max / a_min), local))


def _first_label(raw: Any) -> str:
    """First label of the sample's json meta as a string, "" when absent or unreadable."""
    try:
        labels = json.loads(raw).get("labels") or []
    except (TypeError, ValueError, AttributeError):
        return ""
    return str(labels[0]) if labels else ""


class MultiViewCropper:
    """Callable class for `map_batches(batch_format="numpy")`.

    In: `key` (or WebDataset's `__key__`) str, `jpg` bytes, `json` str/bytes meta.
    Out: `views` (B, M, S, S, 3) uint8, `boxes` (B, M, 4) float32 in the image's [0, 1] frame,
    `ann_views` (B, A, S, S, 3) uint8; with `keep_meta` also `key` and `labels` (str, first label
    or ""), and with text annotations `texts` (the strings behind `tokens`). Those are off by
    default because `iter_torch_batches` (the trainer) cannot carry string
    columns. With text annotations (`views.text.source` captions/boxes, and annotation views to pair
    them with) also `tokens` (B, context_length) int64: one string per image per epoch, picked with
    its own generator seeded like the crops (so the views are the same with or without text), and
    tokenised here on the CPU. Samples without that text are skipped and counted by reason.
    """

    def __init__(
        self,
        cfg_views: ViewsConfig | dict,
        seed: int = 0,
        stats_name: str | None = "crop-stats",
        keep_meta: bool = False,
    ):
        self.cfg = cfg_views if isinstance(cfg_views, ViewsConfig) else section_from_dict(ViewsConfig, cfg_views)
        self.seed = int(seed)
        check_text_config(self.cfg.text)
        self.text = self.cfg.text if self.cfg.text.source != "none" and self.cfg.annotation_views > 0 else None
        self.tokenizer = None
        if self.text is not None:
            from pipeline.data.tokens import build_tokenizer

            self.tokenizer = build_tokenizer(self.text.tokenizer, self.text.context_length)
        self.keep_meta = keep_meta
        import torch

        from pipeline.data.views import make_views

        self.make_views = make_views
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            torch.set_num_threads(1)  # a crop actor has one CPU (views.cpus_per_actor); views resize in torch
        self.draft = draft_size(self.cfg)
        self.stats = crop_stats_actor(stats_name) if stats_name else None
        self.local_visits: Counter = Counter()  # epochs when no stats actor is given

    def rng_for(self, key: str, epoch: int, copy: int = 0) -> np.random.Generator:
        """The crops' generator of (seed, key, epoch): the pass, when the stream says (passes.py)."""
        extra = [2, copy] if copy else []  # a mixture's repeated copy of a source cuts its own crops
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), epoch, *extra])

    def text_rng_for(self, key: str, epoch: int, copy: int = 0) -> np.random.Generator:
        """The caption choice's own stream: drawing from rng_for would shift every crop."""
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), epoch, 1, *([copy] if copy else [])])

    def _epochs(self, counts: dict[str, int], keys: list[str]) -> list[int]:
        if self.stats is not None:
            return ray.get(self.stats.record.remote(counts, keys))
        epochs = [self.local_visits[k] for k in keys]
        self.local_visits.update(keys)
        return epochs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys_in = batch["key"] if "key" in batch else batch["__key__"]
        metas = batch["json"] if "json" in batch else [None] * len(keys_in)
        txts = batch["txt"] if "txt" in batch else [None] * len(keys_in)
        counts: Counter = Counter()
        kept = []  # (key, decoded image, meta)
        where: list[int] = []  # each kept sample's row in the batch
        texts: list[list[str]] = []  # each kept sample's candidate strings (text annotations only)
        for index, (key, data, meta, txt) in enumerate(zip(keys_in, batch["jpg"], metas, txts)):
            if self.text is not None:  # checked before decoding: cheaper, and a skip either way
                try:
                    candidates = annotation_texts(meta, txt, self.text)
                except MissingAnnotation as exc:
                    counts[exc.reason] += 1
                    continue
            try:
                rgb = decode_rgb(bytes(data) if data is not None else b"", draft_to=self.draft)
            except BadImage as exc:
                counts[exc.reason] += 1
                continue
            except Exception:  # noqa: BLE001 - one unclassified decode error must not kill the actor
                counts[CORRUPT] += 1
                continue
            kept.append((str(key), rgb, meta))
            where.append(index)
            if self.text is not None:
                texts.append(candidates)
        counts[OK] = len(kept)
        exact = "pass" in batch and "row" in batch  # a stream of exact passes (passes.py): crops by pass
        if exact:
            self._epochs(dict(counts), [])  # counts only
            epochs = [int(batch["pass"][i]) for i in where]
            copies = [int(c) for c in row_copy(batch["row"][where])] if where else []
        else:
            epochs = self._epochs(dict(counts), [k for k, _, _ in kept])
            copies = [0] * len(kept)

        c, s, m, a = self.cfg, self.cfg.view_size, self.cfg.num_views, self.cfg.annotation_views
        out = {
            "views": np.empty((len(kept), m, s, s, 3), np.uint8),
            "boxes": np.empty((len(kept), m, 4), np.float32),
            "ann_views": np.empty((len(kept), a, s, s, 3), np.uint8),
        }
        if c.local_views > 0:  # DINO multi-crop
            out["local_views"] = np.empty((len(kept), c.local_views, c.local_size, c.local_size, 3), np.uint8)
        for i, ((key, rgb, _), epoch, copy) in enumerate(zip(kept, epochs, copies)):
            self.make_views(
                rgb, self.rng_for(key, epoch, copy), c, into={name: column[i] for name, column in out.items()}
            )
        if exact:
            out["pass"] = np.asarray(batch["pass"][where], np.int64).reshape(len(kept))
            out["row"] = np.asarray(batch["row"][where], np.int64).reshape(len(kept))
        if self.text is not None:
            from pipeline.data.tokens import tokenize

            chosen = [
                pick(t, self.text_rng_for(key, epoch, copy))
                for t, (key, _, _), epoch, copy in zip(texts, kept, epochs, copies)
            ]
            out["tokens"] = tokenize(self.tokenizer, chosen, self.text.context_length)
            if self.keep_meta:
                out["texts"] = np.array(chosen, dtype=object)
        if self.keep_meta:
            out["key"] = np.array([k for k, _, _ in kept], dtype=object)
            out["labels"] = np.array([_first_label(meta) for _, _, meta in kept], dtype=object)
        return out


def _label_matches(value: str | None, wanted: str) -> bool:
    """One of Ray's label-selector values: `v`, `!v`, `in(a,b)` or `!in(a,b)`."""
    negate = wanted.startswith("!")
    wanted = wanted[1:] if negate else wanted
    listed = wanted.startswith("in(") and wanted.endswith(")")
    options = {w.strip() for w in wanted[3:-1].split(",")} if listed else {wanted}
    return (value in options) != negate


def crop_node_cpus(cfg_views: ViewsConfig, nodes: list[dict] | None = None) -> float | None:
    """CPUs of the alive nodes a crop actor may land on under `views.resources` / `views.label_selector`
    (`nodes`: `ray.nodes()`), or None when the actors are not restricted to some nodes."""
    if not cfg_views.resources and not cfg_views.label_selector:
        return None
    total = 0.0
    for node in ray.nodes() if nodes is None else nodes:
        res, labels = node.get("Resources", {}), node.get("Labels", {})
        fits = all(res.get(k, 0.0) >= v for k, v in cfg_views.resources.items())
        labelled = all(_label_matches(labels.get(k), v) for k, v in cfg_views.label_selector.items())
        if node.get("Alive") and fits and labelled:
            total += res.get("CPU", 0.0)
    return total


def crop_pool_size(cfg_views: ViewsConfig, nodes: list[dict] | None = None) -> int:
    """Most crop actors one stream runs: `views.concurrency`; else, for actors restricted to some nodes,
    as many as those nodes' CPUs hold (`views.cpus_per_actor` each); else the cluster's CPUs - 1."""
    if cfg_views.concurrency:
        return cfg_views.concurrency
    cpus = crop_node_cpus(cfg_views, nodes)
    if cpus is None:
        return max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    if cpus < cfg_views.cpus_per_actor:
        raise ConfigError(
            f"no alive node offers views.resources={cfg_views.resources} / "
            f"views.label_selector={cfg_views.label_selector} with >= {cfg_views.cpus_per_actor:g} CPU; "
            "start the crop nodes, or set views.concurrency to let an autoscaler add them"
        )
    return max(1, int(cpus // cfg_views.cpus_per_actor))


def build_crop_dataset(
    ds: ray.data.Dataset,
    cfg_views: ViewsConfig,
    seed: int = 0,
    stats_name: str | None = "crop-stats",
    keep_meta: bool = False,
) -> ray.data.Dataset:
    """Apply the crop stage (lazy, streaming) to a dataset with `key`/`__key__`, `jpg`, `json`.

    An autoscaling pool of 1..`crop_pool_size(cfg_views)` actors, `cfg_views.cpus_per_actor` CPUs
    each, placed by `views.resources` / `views.label_selector` when set. Read counts with
    `crop_stats(stats_name)`.
    """
    if stats_name:
        crop_stats_actor(stats_name)
    max_size = crop_pool_size(cfg_views)
    return ds.map_batches(
        MultiViewCropper,
        fn_constructor_kwargs={
            "cfg_views": dataclasses.asdict(cfg_views),
            "seed": seed,
            "stats_name": stats_name,
            "keep_meta": keep_meta,
        },
        batch_size=cfg_views.batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        # All actors start at once: growing the pool from 1 costs an actor start-up per added actor
        # on every pass (Ray Data builds a new pool per execution); it may still shrink to 1.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_size, initial_size=max_size),
        num_cpus=cfg_views.cpus_per_actor,
        **placement(cfg_views),
    )


def placement(cfg_views: ViewsConfig) -> dict[str, Any]:
    """map_batches arguments that keep the crop actors on the nodes `views.resources` /
    `views.label_selector` name (e.g. CPU-only nodes, while training workers hold the GPU nodes)."""
    args: dict[str, Any] = {}
    if cfg_views.resources:
        args["resources"] = dict(cfg_views.resources)
    if cfg_views.label_selector:
        args["label_selector"] = dict(cfg_views.label_selector)
    return args
