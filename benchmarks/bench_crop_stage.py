"""Crop-stage throughput: the Ray Data actor stage vs a torch DataLoader vs a decode-only floor.

All three start from the same JPEG bytes in memory (real photos from scikit-image, re-cropped into
`--images` files at max side 384), so the comparison is decode + view cutting, not disk I/O:
  (a) ray:    build_crop_dataset on a materialised dataset, `--workers` crop actors;
  (b) torch:  a DataLoader with `--workers` processes doing the same decode_rgb + make_views;
  (c) decode: decode_rgb of every image in this one process: what one core spends before cutting
      a single view (a/c says how many decode-only cores the whole stage is worth).
Each row is the second of two passes (imports and page cache warm). Ray's wall time includes
starting its actor pool, which Ray Data does anew on every pass; "steady" excludes the time to
the first batch. Views/s counts every view once, M crops + A annotation views, as the budget does.

    .venv/bin/python benchmarks/bench_crop_stage.py --images 400
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import RayConfig, ViewsConfig
from pipeline.data.crop_stage import build_crop_dataset, crop_stats, draft_size
from pipeline.data.sample_data import photo_arrays, write_photo_files
from pipeline.data.schema import decode_rgb
from pipeline.data.views import make_views


def load_jpegs(n: int, folder: str) -> list[bytes]:
    paths = write_photo_files(folder, copies=-(-n // len(photo_arrays())), max_side=384)
    return [p.read_bytes() for p in sorted(paths)[:n]]


def timed_pass(batches, rows_of) -> tuple[int, float, float]:
    """(rows, wall seconds, seconds after the first batch arrived) for one full pass."""
    t0 = time.perf_counter()
    first, rows, first_rows = None, 0, 0
    for batch in batches():
        rows += rows_of(batch)
        if first is None:
            first, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    steady = (rows - first_rows) / (end - first) if first is not None and end > first else float("nan")
    return rows, end - t0, steady


def bench_ray(ds, cfg: ViewsConfig, name: str):
    out = build_crop_dataset(ds, cfg, seed=0, stats_name=name)
    run = lambda: out.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")
    timed_pass(run, lambda b: len(b["boxes"]))  # warm-up pass
    return timed_pass(run, lambda b: len(b["boxes"]))


class ViewsDataset:
    """Map-style torch dataset: the same decode + make_views per image as one crop-actor row."""

    def __init__(self, jpegs: list[bytes], cfg: ViewsConfig):
        self.jpegs, self.cfg, self.draft = jpegs, cfg, draft_size(cfg)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        rgb = decode_rgb(self.jpegs[i], draft_to=self.draft)
        return make_views(rgb, np.random.default_rng([0, i]), self.cfg)


def bench_torch(jpegs: list[bytes], cfg: ViewsConfig, workers: int):
    import torch.utils.data

    loader = torch.utils.data.DataLoader(ViewsDataset(jpegs, cfg), batch_size=cfg.batch_size, num_workers=workers)
    timed_pass(lambda: iter(loader), lambda b: len(b["boxes"]))
    return timed_pass(lambda: iter(loader), lambda b: len(b["boxes"]))


def bench_decode(jpegs: list[bytes], cfg: ViewsConfig):
    draft = draft_size(cfg)
    run = lambda: ([decode_rgb(j, draft_to=draft)] for j in jpegs)
    timed_pass(run, len)
    return timed_pass(run, len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="values of M")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2, help="crop actors / DataLoader workers")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.runtime import init_ray

    ray = init_ray(RayConfig(num_cpus=args.cpus))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-crop-") as tmp:
        jpegs = load_jpegs(args.images, tmp)
    meta = json.dumps({"labels": []})
    ds = ray.data.from_items([{"key": f"{i:09d}", "jpg": j, "json": meta} for i, j in enumerate(jpegs)]).materialize()
    print(f"{len(jpegs)} JPEGs, max side 384, {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB mean; "
          f"view size {args.size}; {args.workers} Ray crop actors / DataLoader workers; {os.cpu_count()} CPU cores")

    head = f"{'M':>2} {'A':>2} | {'ray img/s':>9} {'(steady)':>9} {'views/s':>8} | {'torch img/s':>11} {'views/s':>8} | {'decode img/s':>12} | {'a/b':>5} {'a/c':>5}"
    print(head)
    print("-" * len(head))
    for m in args.views:
        cfg = ViewsConfig(num_views=m, view_size=args.size, concurrency=args.workers, batch_size=32)
        per_image = cfg.num_views + cfg.annotation_views
        n_ray, t_ray, steady = bench_ray(ds, cfg, f"bench-crop-{m}")
        assert n_ray == len(jpegs), crop_stats(f"bench-crop-{m}")
        n_torch, t_torch, _ = bench_torch(jpegs, cfg, args.workers)
        n_dec, t_dec, _ = bench_decode(jpegs, cfg)
        a, b, c = n_ray / t_ray, n_torch / t_torch, n_dec / t_dec
        print(f"{m:>2} {cfg.annotation_views:>2} | {a:>9.1f} {steady:>9.1f} {a * per_image:>8.0f} | {b:>11.1f} {b * per_image:>8.0f} | {c:>12.1f} | {a / b:>5.2f} {a / c:>5.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
