"""Decoupled annotation / propagation streams (AB_{I1K+D}) and weighted shard mixtures, on real Ray."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from pipeline.config import ConfigError
from pipeline.data.mixing import mixture_counts
from tests.test_train import micro_config


@pytest.fixture(scope="module")
def photo_shards(ray_cluster, photo_files, tmp_path_factory):
    from pipeline.config import IngestConfig
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("photo_shards")
    items = [{"input": str(p), "id": p.stem} for p in photo_files]
    stats = write_shards(items, str(out), "files", IngestConfig(samples_per_shard=4))
    assert stats["counts"]["ok"] == len(photo_files)
    return out


def test_mixture_counts_follow_the_weights():
    sizes = {"a": 300, "b": 20}
    counts = mixture_counts(sizes, {"a": 1.0, "b": 1.0})
    assert counts == {"a": 160.0, "b": 160.0}  # one pass = 320 samples, half each: b repeated 8x
    assert mixture_counts(sizes, {"a": 3, "b": 1}) == {"a": 240.0, "b": 80.0}
    with pytest.raises(ConfigError, match="weights"):
        mixture_counts(sizes, {"a": -1.0, "b": 1.0})
    with pytest.raises(ConfigError, match="weights"):
        mixture_counts(sizes, {"a": 0, "b": 0})


def test_a_mixture_stream_draws_each_source_at_its_weight(ray_cluster, digit_shards, photo_shards):
    from pipeline.data.mixing import stream_dataset
    from pipeline.data.shards import load_stats

    n_digits = load_stats(str(digit_shards))["counts"]["ok"]
    n_photos = load_stats(str(photo_shards))["counts"]["ok"]
    ds = stream_dataset(str(digit_shards), {str(digit_shards): 1.0, str(photo_shards): 1.0}, read_cpus=0.25)
    rows = ds.select_columns(["__url__", "row"]).take_all()
    by_source = Counter("photo_shards" in r["__url__"] for r in rows)
    half = (n_digits + n_photos) / 2
    # photos (small) are repeated whole floor(half / n_photos) times plus a Bernoulli top-up;
    # digits are a Bernoulli sample of half their rows: both within 4 sd of the expectation
    for realised in (by_source[True], by_source[False]):
        assert abs(realised - half) <= 4 * math.sqrt(half), (by_source, half)
    assert by_source[True] >= n_photos * int(half // n_photos)
    assert len({r["row"] for r in rows}) == len(rows)  # each repeated copy is its own row of the pass


def test_unknown_or_empty_mixture_source_is_a_clear_error(ray_cluster, digit_shards, tmp_path):
    from pipeline.data.mixing import stream_dataset

    with pytest.raises(FileNotFoundError, match="_stats.json"):
        stream_dataset("", {str(digit_shards): 1.0, str(tmp_path / "nope"): 1.0})


def test_decoupled_run_needs_cpus_for_both_streams(ray_cluster, digit_shards, photo_shards, tmp_path):
    from pipeline.train.trainer import run_pretrain

    cfg = micro_config(tmp_path, photo_shards, steps=1)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, annotation_shards=str(digit_shards)),
        train=dataclasses.replace(cfg.train, cpus_per_worker=1.0),
    )
    with pytest.raises(ConfigError, match=r"2 stream\(s\)"):
        run_pretrain(cfg)


def test_passes_needed_covers_the_budget_within_the_cap():
    from pipeline.data.mixing import passes_needed

    assert passes_needed(images_needed=600, pass_size=300, max_passes=50) == 3  # 2 passes + 1 spare
    assert passes_needed(images_needed=601, pass_size=300, max_passes=50) == 4
    assert passes_needed(images_needed=10, pass_size=300, max_passes=50) == 2
    assert passes_needed(images_needed=10**6, pass_size=300, max_passes=50) == 50
    assert passes_needed(images_needed=600, pass_size=300, max_passes=1) == 1


def test_passes_are_one_capped_read_of_shard_files_in_a_seeded_order(ray_cluster, digit_shards):
    """A stream's passes are one read operator over (pass, file) items (so `read_concurrency` bounds
    the read tasks an execution starts), every file once per pass, each pass in its seeded order
    (the order itself: tests/test_resume.py)."""
    from pipeline.data.mixing import default_read_concurrency, stream_dataset

    ds = stream_dataset(str(digit_shards), {}, read_cpus=0.25, passes=4, read_concurrency=1, seed=0)
    assert "read_items" in str(ds._logical_plan.dag) and "Union" not in str(ds._logical_plan.dag)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))  # one per tar; concurrency 1: in order
    order = [(int(b["pass"][0]), str(b["__url__"][0]).rsplit("/", 1)[-1]) for b in blocks]
    assert [p for p, _ in order] == sorted(p for p, _ in order) and len(order) == 12
    assert all(sorted(f for p, f in order if p == k) == sorted({f for _, f in order}) for k in range(4))

    assert [default_read_concurrency(n) for n in (1, 8, 9, 40)] == [1, 1, 2, 5]
    with pytest.raises(ConfigError, match="read_concurrency"):
        stream_dataset(str(digit_shards), {}, read_concurrency=0)


def test_several_passes_stream_in_one_execution_with_new_crops_per_pass(ray_cluster, digit_shards):
    """The trainer's multi-pass stream: every sample once per pass, and a pass never repeats crops."""
    from pipeline.config import ViewsConfig
    from pipeline.data.crop_stage import build_crop_dataset, crop_stats
    from pipeline.data.mixing import stream_dataset, stream_size

    size = stream_size(str(digit_shards), {})
    assert size == 300
    views = ViewsConfig(num_views=2, view_size=16, annotation_views=0, batch_size=50, concurrency=1, cpus_per_actor=0.5)
    ds = stream_dataset(str(digit_shards), {}, read_cpus=0.25, passes=3)
    rows = build_crop_dataset(ds, views, stats_name="three-passes", keep_meta=True).take_all()
    boxes_by_key: dict[str, list] = {}
    for row in rows:
        boxes_by_key.setdefault(row["key"], []).append(row["boxes"].tobytes())
    assert len(rows) == 3 * size and len(boxes_by_key) == size
    assert all(len(seen) == 3 for seen in boxes_by_key.values())
    assert all(len(set(seen)) == 3 for seen in boxes_by_key.values())  # each pass cut new boxes
    assert crop_stats("three-passes") == {"ok": 3 * size}
    # a pass's crops depend on (seed, key, pass) only, not on when or where the pass runs
    again = build_crop_dataset(
        stream_dataset(str(digit_shards), {}, read_cpus=0.25, passes=3), views, stats_name="again", keep_meta=True
    )
    same = {(r["key"], int(r["pass"])): r["boxes"].tobytes() for r in again.take_all()}
    assert same == {(r["key"], int(r["pass"])): r["boxes"].tobytes() for r in rows}
