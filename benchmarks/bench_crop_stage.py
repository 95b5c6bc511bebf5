"""Crop-stage throughput: the Ray Data actor stage vs a torch DataLoader vs a decode-only floor.

All three read the same real WebDataset shards: `--images` real photos (scikit-image, re-cropped, max
side `--max-side`, default 384 = `ingest.max_side`) written into `--shards` tar files by abpipe's own
ingest (`write_photo_shards`); page cache warm, so the comparison is read + decode + view cutting,
not the disk:
  (a) ray:    `stream_dataset` -> `build_crop_dataset`, `--workers` crop actors: the trainer's path
      (one read of all passes, `default_read_concurrency` read tasks);
  (b) torch:  a DataLoader over `webdataset.WebDataset` on the same tars, `--workers` processes doing
      the same decode_rgb + make_views: the usual way a PyTorch job streams shards;
  (c) decode: decode_rgb of every image in this one process: what one core spends before cutting
      a single view (a/c says how many decode-only cores the whole stage is worth).
Each path first runs one warm-up pass (imports, page cache, Ray's worker pool), then is timed over
`--passes` passes (default: `data.max_passes_per_execution`, the most the trainer streams per
execution): Ray in ONE execution, as the trainer does, the DataLoader rebuilding its worker
processes per pass (fork: cheap), as a default `DataLoader` does. "start s" is the time to the
first batch: Ray Data starts a new actor pool per execution (worker processes importing ray.data,
torch, OpenCV), paid once per execution; "steady" is the rate after it: what a long run sees. a/b is
on the whole run, "steady" on the steady columns. "ray 1 pass" runs one execution per pass (what an
epoch-by-epoch loop would get). "0.9 from": images one execution has to
stream for the whole-run a/b to reach 0.9, from the measured start-up and steady rates (the trainer
streams up to 16 passes of the dataset per execution). Views/s counts every view once, M crops
+ A annotation views, as the budget does.

    .venv/bin/python benchmarks/bench_crop_stage.py --images 1000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import DataConfig, IngestConfig, RayConfig, ViewsConfig
from pipeline.data.crop_stage import build_crop_dataset, crop_pool_size, crop_stats, draft_size
from pipeline.data.mixing import default_read_concurrency, stream_dataset
from pipeline.data.sample_data import write_photo_shards
from pipeline.data.schema import decode_rgb
from pipeline.data.views import make_views


def write_bench_shards(n: int, folder: str, shards: int, max_side: int) -> tuple[str, list[str]]:
    """`n` photos ingested by abpipe into `shards` WebDataset tars: (shard dir, tar paths)."""
    stats = write_photo_shards(folder, n, samples_per_shard=-(-n // shards), max_side=max_side)
    assert stats["counts"] == {"ok": n}, stats["counts"]
    out = os.path.join(folder, "shards")
    return out, [os.path.join(out, name) for name in stats["shards"]]


def shard_jpegs(tars: list[str]) -> list[bytes]:
    import webdataset as wds

    return [sample["jpg"] for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]


def process_role(proc: psutil.Process, me: int) -> str:
    """Which part of the pipeline a process is: what its CPU seconds are booked to."""
    cmd = " ".join(proc.info["cmdline"] or [])
    if proc.pid == me:
        return "driver"
    if "MultiViewCropper" in cmd or proc.info["ppid"] == me and not cmd.startswith("ray"):
        return "crop workers"  # Ray crop actors, or the DataLoader's forked workers
    if "ray" in cmd:
        return "ray other"  # raylet, GCS, dashboard, read tasks, stats actor, idle workers
    return "machine"


class CpuLedger:
    """CPU seconds each part of the pipeline spends during a pass (psutil snapshots, <= 2 per s).

    Measures where the cores go: how much of the machine the crop workers get vs the driver and
    Ray's own processes. A process that exits keeps its last snapshot, so a torn-down actor pool
    loses at most its last half second.
    """

    def __init__(self):
        self.me = os.getpid()
        self.start = self._snapshot()
        self.last, self.at = dict(self.start), time.perf_counter()

    def _snapshot(self) -> dict:
        out = {}
        for proc in psutil.process_iter(["cmdline", "ppid", "cpu_times", "create_time"]):
            cpu = proc.info["cpu_times"]
            if cpu is not None:
                out[(proc.pid, proc.info["create_time"])] = (process_role(proc, self.me), cpu.user + cpu.system)
        return out

    def tick(self, force: bool = False) -> None:
        if force or time.perf_counter() - self.at > 0.5:
            self.last.update(self._snapshot())
            self.at = time.perf_counter()

    def seconds(self) -> Counter:
        self.tick(force=True)
        totals: Counter = Counter()
        for key, (role, cpu) in self.last.items():
            totals[role] += cpu - self.start.get(key, (role, 0.0))[1]
        return totals


def timed_pass(batches, rows_of, ledger: CpuLedger | None = None) -> tuple[int, float, float, float]:
    """(rows, wall seconds, rows/s after the first batch arrived, seconds to the first batch) for one run."""
    t0 = time.perf_counter()
    first, rows, first_rows = None, 0, 0
    for batch in batches():
        rows += rows_of(batch)
        if first is None:
            first, first_rows = time.perf_counter(), rows
        if ledger is not None:
            ledger.tick()
    end = time.perf_counter()
    steady = (rows - first_rows) / (end - first) if first is not None and end > first else float("nan")
    return rows, end - t0, steady, (first if first is not None else end) - t0


def bench_ray(shard_dir: str, cfg: ViewsConfig, name: str, passes: int = 1, warm_up: bool = False):
    """`passes` passes over the shards in ONE execution (as the trainer streams them): one actor start-up."""
    source = stream_dataset(
        shard_dir, {}, DataConfig().read_cpus, passes, default_read_concurrency(crop_pool_size(cfg))
    )
    out = build_crop_dataset(source, cfg, seed=0, stats_name=name)
    run = lambda: out.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")
    if warm_up:
        timed_pass(run, lambda b: len(b["boxes"]))
    ledger = CpuLedger()
    return (*timed_pass(run, lambda b: len(b["boxes"]), ledger), ledger.seconds())


class SampleViews:
    """WebDataset sample -> the same decode + make_views as one crop-actor row (picklable for workers)."""

    def __init__(self, cfg: ViewsConfig):
        self.cfg, self.draft = cfg, draft_size(cfg)

    def __call__(self, sample: dict):
        rgb = decode_rgb(sample["jpg"], draft_to=self.draft)
        return make_views(rgb, np.random.default_rng([0, int(sample["__key__"])]), self.cfg)


def bench_torch(tars: list[str], cfg: ViewsConfig, workers: int, passes: int = 1):
    """A DataLoader over the same tars (webdataset splits the shards between the workers), `passes` times."""
    import torch.utils.data
    import webdataset as wds

    dataset = wds.WebDataset(tars, shardshuffle=False, empty_check=False).map(SampleViews(cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers)
    timed_pass(lambda: iter(loader), lambda b: len(b["boxes"]))  # warm-up: one pass
    run = lambda: (batch for _ in range(passes) for batch in loader)
    ledger = CpuLedger()
    return (*timed_pass(run, lambda b: len(b["boxes"]), ledger), ledger.seconds())


def bench_decode(jpegs: list[bytes], cfg: ViewsConfig):
    draft = draft_size(cfg)
    run = lambda: ([decode_rgb(j, draft_to=draft)] for j in jpegs)
    timed_pass(run, len)
    return timed_pass(run, len)[:2]


def images_for_ratio(start_s: float, ray_steady: float, torch_steady: float, ratio: float = 0.9) -> float:
    """Images one execution must stream for Ray's whole-run rate, N / (start + N / ray_steady), to
    reach `ratio` x the DataLoader's steady rate: how long a run has to be for the one-off actor
    start-up not to matter (inf when even the steady rates are below the ratio)."""
    target = ratio * torch_steady
    return target * start_s / (1 - target / ray_steady) if ray_steady > target else float("inf")


def ms_per_call(fn, items) -> float:
    fn(items[0])  # warm
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - t0) / len(items) * 1e3


def pillow_cut_views(rgb: np.ndarray, boxes_px: np.ndarray, size: int) -> list:
    """Baseline for the breakdown: Pillow's antialiased bilinear crop+resize (abpipe's earlier way)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    return [np.asarray(image.resize((size, size), Image.BILINEAR, box=tuple(map(float, b)))) for b in boxes_px]


def print_breakdown(jpegs: list[bytes], cfg: ViewsConfig) -> None:
    """Where one core's time goes per image (one process, no Ray): why the decode-only floor is far."""
    from pipeline.data.views import colour_jitter, cut_views, gaussian_blur, sample_boxes

    draft = draft_size(cfg)
    rgbs = [decode_rgb(j, draft_to=draft) for j in jpegs]
    rng = np.random.default_rng(0)
    boxes = [sample_boxes(rng, r.shape[0], r.shape[1], cfg.num_views, cfg.scale, cfg.ratio) for r in rgbs]
    views = [cut_views(r, b[:1], cfg.view_size)[0] for r, b in zip(rgbs, boxes)]
    decode = ms_per_call(lambda j: decode_rgb(j, draft_to=draft), jpegs)
    rows = [
        ("JPEG decode (draft-reduced)", decode),
        (
            f"cut + resize {cfg.num_views} crops",
            ms_per_call(lambda i: cut_views(rgbs[i], boxes[i], cfg.view_size), range(len(rgbs))),
        ),
        (
            "  same with Pillow (baseline)",
            ms_per_call(lambda i: pillow_cut_views(rgbs[i], boxes[i], cfg.view_size), range(len(rgbs))),
        ),
        ("colour jitter, 1 view (p=0.8)", ms_per_call(lambda v: colour_jitter(rng, v, cfg.color_jitter), views)),
        ("Gaussian blur, 1 view (sigma 1)", ms_per_call(lambda v: gaussian_blur(v, 1.0), views)),
        (
            f"make_views: all {cfg.num_views} + {cfg.annotation_views} views",
            ms_per_call(lambda r: make_views(r, rng, cfg), rgbs),
        ),
    ]
    print(f"\nper-image cost on one core, M = {cfg.num_views}, {cfg.view_size} px (ms; x decode)")
    for name, ms in rows:
        print(f"  {name:<36} {ms:>7.2f} {ms / decode:>6.1f}x")
    print(
        f"  the crop stage is at >= 0.5x the decode-only floor per core only if all of it costs <= {2 * decode:.2f} ms"
    )


def print_cpu_ledger(rows, cores: int) -> None:
    """Where the machine's CPU seconds went in each measured pass (psutil, per process role)."""
    roles = ("crop workers", "driver", "ray other", "machine")
    print(f"\nCPU seconds per 100 images by process role (wall x {cores} cores = what the machine had)")
    head = (
        f"{'M':>2} {'path':<14} | {'wall x cores':>12} | "
        + " ".join(f"{r:>12}" for r in roles)
        + f" | {'crop share':>10}"
    )
    print(head)
    print("-" * len(head))
    for m, name, n, wall, cpu in rows:
        per = 100 / n
        cells = " ".join(f"{cpu.get(r, 0.0) * per:>12.2f}" for r in roles)
        print(
            f"{m:>2} {name:<14} | {wall * cores * per:>12.2f} | {cells} | "
            f"{cpu.get('crop workers', 0.0) / (wall * cores):>10.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument(
        "--shards",
        type=int,
        default=8,
        help="tar files (>= workers: webdataset gives each DataLoader worker whole shards)",
    )
    ap.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="values of M")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument(
        "--max-side",
        type=int,
        default=IngestConfig().max_side,
        help="longest side of the stored JPEGs (ingest.max_side): the decode floor grows with it, the views' cost "
        "little",
    )
    ap.add_argument("--batch", type=int, default=ViewsConfig().batch_size, help="rows per crop batch (both paths)")
    ap.add_argument("--workers", type=int, default=2, help="crop actors / DataLoader workers")
    ap.add_argument(
        "--passes",
        type=int,
        default=DataConfig().max_passes_per_execution,
        help="passes per timed run (Ray: streamed in one execution, the trainer's way)",
    )
    ap.add_argument(
        "--cpus",
        type=int,
        default=os.cpu_count() + 1,
        help="logical CPUs of the local Ray instance: one per crop actor plus one for the shard-read tasks "
        "(data.read_cpus each, mostly I/O), which the trainer reserves the same way",
    )
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.runtime import init_ray

    ray = init_ray(RayConfig(num_cpus=args.cpus))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-crop-") as tmp:
        shard_dir, tars = write_bench_shards(args.images, tmp, args.shards, args.max_side)
        jpegs = shard_jpegs(tars)
        print(
            f"{len(jpegs)} JPEGs in {len(tars)} shards, max side {args.max_side}, "
            f"{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB mean; "
            f"view size {args.size}; batches of {args.batch}; {args.workers} Ray crop actors / DataLoader workers; "
            f"{os.cpu_count()} CPU cores"
        )
        print(
            f"ray 1 pass: one execution per pass (an epoch-by-epoch loop); ray / torch: {args.passes} passes per run "
            "(Ray: one "
            "execution, the trainer's way); start s: to the first batch; a/b on whole runs, a/c per core (a / workers "
            "/ c); 0.9 from: images per "
            f"execution from which the whole-run a/b >= 0.9"
        )
        head = (
            f"{'M':>2} {'A':>2} | {'ray 1 pass':>10} | {'ray img/s':>9} {'start s':>7} {'(steady)':>9} {'views/s':>8} "
            "| "
            f"{'torch img/s':>11} {'start s':>7} {'(steady)':>9} | {'decode img/s':>12} | {'a/b':>5} {'steady':>6} "
            f"{'a/c':>5} | {'0.9 from':>8}"
        )
        print(head)
        print("-" * len(head))
        cpu_rows = []
        for m in args.views:
            cfg = ViewsConfig(num_views=m, view_size=args.size, concurrency=args.workers, batch_size=args.batch)
            per_image = cfg.num_views + cfg.annotation_views
            n_one, t_one, _, _, _ = bench_ray(shard_dir, cfg, f"bench-crop-{m}", warm_up=True)  # also warms the next
            assert n_one == len(jpegs), crop_stats(f"bench-crop-{m}")
            n_ray, t_ray, steady_ray, start_ray, cpu_ray = bench_ray(
                shard_dir, cfg, f"bench-crop-{m}-passes", args.passes
            )
            assert n_ray == args.passes * len(jpegs), crop_stats(f"bench-crop-{m}-passes")
            n_torch, t_torch, steady_torch, start_torch, cpu_torch = bench_torch(tars, cfg, args.workers, args.passes)
            assert n_torch == n_ray, (n_torch, n_ray)
            n_dec, t_dec = bench_decode(jpegs, cfg)
            one, a, b, c = n_one / t_one, n_ray / t_ray, n_torch / t_torch, n_dec / t_dec
            print(
                f"{m:>2} {cfg.annotation_views:>2} | {one:>10.1f} | {a:>9.1f} {start_ray:>7.2f} {steady_ray:>9.1f} "
                f"{a * per_image:>8.0f} | "
                f"{b:>11.1f} {start_torch:>7.2f} {steady_torch:>9.1f} | {c:>12.1f} | {a / b:>5.2f} "
                f"{steady_ray / steady_torch:>6.2f} {a / args.workers / c:>5.2f} | "
                f"{images_for_ratio(start_ray, steady_ray, steady_torch):>8.0f}"
            )
            cpu_rows += [(m, "ray", n_ray, t_ray, cpu_ray), (m, "torch", n_torch, t_torch, cpu_torch)]
    ray.shutdown()
    print_cpu_ledger(cpu_rows, os.cpu_count())
    print_breakdown(jpegs, ViewsConfig(num_views=4, view_size=args.size))


if __name__ == "__main__":
    main()
