"""What exact passes cost the crop stream: the pass reader vs Ray Data's read_webdataset, and
`data.deterministic` (preserve_order) vs not, in one run on the same shards (ratios, not seconds).

Three streams of `--passes` passes over `--images` real photos (scikit-image, ingested by abpipe into
`--shards` tars), each through the same crop stage (`--workers` actors, M=`--views` crops of
`--size` px plus 2 annotation views), timed end to end over ONE execution, as the trainer streams:
  (a) webdataset:   `read_shards(passes=...)` -> crops: the stream before exact passes (no pass/row columns)
  (b) passes:       `stream_dataset` -> crops: the trainer's stream (pass/row columns, resumable)
  (c) deterministic: (b) with Ray Data's preserve_order
Rounds alternate a, b, c so that a busy host slows all three alike; the best of `--rounds` is kept.

    .venv/bin/python benchmarks/bench_passes.py --images 600 --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import DataConfig, RayConfig, ViewsConfig  # noqa: E402
from pipeline.data.crop_stage import build_crop_dataset, crop_pool_size  # noqa: E402
from pipeline.data.mixing import default_read_concurrency, stream_dataset  # noqa: E402
from pipeline.data.sample_data import write_photo_shards  # noqa: E402
from pipeline.data.shards import read_shards  # noqa: E402


def timed(ds, batch: int) -> tuple[int, float]:
    t0, rows = time.perf_counter(), 0
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        rows += len(b["boxes"])
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.runtime import init_ray

    ray = init_ray(RayConfig(num_cpus=os.cpu_count() + 1))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    views = ViewsConfig(
        num_views=args.views, view_size=args.size, annotation_views=2, batch_size=32, concurrency=args.workers
    )
    readers = default_read_concurrency(crop_pool_size(views))
    read_cpus = DataConfig().read_cpus

    with tempfile.TemporaryDirectory(prefix="bench-passes-") as tmp:
        stats = write_photo_shards(tmp, args.images, samples_per_shard=-(-args.images // args.shards))
        shard_dir = os.path.join(tmp, "shards")
        print(
            f"{stats['counts']['ok']} photos in {len(stats['shards'])} shards; {args.passes} passes per execution; "
            f"{args.workers} crop actors, M={args.views} at {args.size} px + 2 annotation views; "
            f"{os.cpu_count()} CPU cores; best of {args.rounds} alternating rounds"
        )

        def streams():
            ctx.execution_options.preserve_order = False
            yield "webdataset", read_shards(shard_dir, "files", read_cpus, args.passes, readers)
            yield "passes", stream_dataset(shard_dir, {}, read_cpus, args.passes, readers)
            ctx.execution_options.preserve_order = True
            yield "deterministic", stream_dataset(shard_dir, {}, read_cpus, args.passes, readers)
            ctx.execution_options.preserve_order = False

        best: dict[str, float] = {}
        for r in range(args.rounds):
            for name, source in streams():
                rows, wall = timed(build_crop_dataset(source, views, stats_name=f"bench-{name}-{r}"), 32)
                assert rows == args.passes * stats["counts"]["ok"], (name, rows)
                rate = rows / wall
                best[name] = max(best.get(name, 0.0), rate)
                print(f"round {r}: {name:13s} {rows} rows in {wall:6.1f} s = {rate:6.1f} rows/s")
        print(
            f"best: webdataset {best['webdataset']:.1f}, passes {best['passes']:.1f}, deterministic "
            f"{best['deterministic']:.1f} rows/s; passes/webdataset {best['passes'] / best['webdataset']:.3f}, "
            f"deterministic/passes {best['deterministic'] / best['passes']:.3f}"
        )


if __name__ == "__main__":
    main()
