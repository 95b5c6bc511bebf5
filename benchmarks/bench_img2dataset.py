"""URL-ingest throughput: our img2dataset ingest vs baselines measured in the same run.

`--images` real JPEGs (scikit-image's photos, re-cropped, original sizes up to ~1,400 px) are
served by `python -m http.server` (a separate process) on 127.0.0.1, then fetched and cut to
`--max-side`, four ways:
  (a) sequential: urllib fetch + Pillow decode + resize + JPEG encode, one image after the other in
      this process: what a naive script does;
  (b) threads:    the same work on a thread pool of `--threads` threads;
  (c) abpipe:     `ingest_url_captions` (img2dataset, `--processes` x `--threads`, then our
      normalisation + manifest): end to end, including img2dataset's process start-up; the row
      "img2dataset workers" is its own rate over its shards' download time (from its stats files);
  (d) local:      our image-folder ingest (`write_shards`, Ray Data) of the same files from disk:
      no HTTP at all, the ceiling for the decode/encode side (Ray start-up excluded).

    .venv/bin/python benchmarks/bench_img2dataset.py --images 400
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from PIL import Image

from pipeline.config import IngestConfig, RayConfig, UrlIngestConfig
from pipeline.data.sample_data import photo_arrays, write_photo_files
from pipeline.data.schema import decode_rgb


def serve(folder: str) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on a free loopback port; returns (process, base URL) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/", timeout=1).read()
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the loopback HTTP server did not start")


def fetch_and_cut(url: str, max_side: int) -> int:
    """The per-image work of a plain downloader: fetch, decode, shrink, re-encode; returns JPEG bytes."""
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    image = Image.fromarray(decode_rgb(data))
    image.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return len(buf.getvalue())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def img2dataset_rate(raw_dir: str) -> float:
    """Images/s over img2dataset's own shard timings (first start to last end, all processes)."""
    stats = [json.load(open(p)) for p in glob.glob(os.path.join(raw_dir, "*_stats.json"))]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["count"] for s in stats) / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--no-local", action="store_true", help="skip (d), which starts Ray")
    args = parser.parse_args()

    from pipeline.runtime import quiet_environment

    quiet_environment()
    work = tempfile.mkdtemp(prefix="bench-img2dataset-")
    paths = sorted(write_photo_files(os.path.join(work, "www"), copies=-(-args.images // len(photo_arrays()))))[
        : args.images
    ]
    names = [os.path.basename(p) for p in paths]
    sizes = [Image.open(p).size for p in paths]
    server, base = serve(os.path.join(work, "www"))
    urls = [f"{base}/{n}" for n in names]
    try:
        seq = timed(lambda: [fetch_and_cut(u, args.max_side) for u in urls])
        with ThreadPoolExecutor(args.threads) as pool:
            thr = timed(lambda: list(pool.map(lambda u: fetch_and_cut(u, args.max_side), urls)))

        from pipeline.data.sources.url_captions import RAW_DIR, ingest_url_captions

        listing = os.path.join(work, "urls.tsv")
        with open(listing, "w") as fh:
            fh.write("url\tcaption\n" + "".join(f"{u}\tphoto {n}\n" for u, n in zip(urls, names)))
        ing = IngestConfig(
            source="cc12m",
            input=listing,
            output=os.path.join(work, "cc"),
            max_side=args.max_side,
            samples_per_shard=args.per_shard,
            cc12m=UrlIngestConfig(processes=args.processes, threads=args.threads, retries=0, keep_raw=True),
        )
        stats = {}
        ours = timed(lambda: stats.update(ingest_url_captions(ing, None, "cc12m")))
        assert stats["counts"] == {"ok": len(urls)}, stats["counts"]
        workers = img2dataset_rate(os.path.join(work, "cc", RAW_DIR))

        local = None
        if not args.no_local:
            import ray

            from pipeline.data.shards import write_shards
            from pipeline.runtime import init_ray

            init_ray(RayConfig(num_cpus=os.cpu_count(), temp_dir=os.path.join(work, "ray")))
            ray.data.DataContext.get_current().enable_progress_bars = False
            items = [{"input": str(p), "id": n} for p, n in zip(paths, names)]
            folder_ing = IngestConfig(source="files", max_side=args.max_side, samples_per_shard=args.per_shard)
            local = timed(lambda: write_shards(items, os.path.join(work, "local"), "files", folder_ing))
            ray.shutdown()
    finally:
        server.kill()

    n = len(urls)
    mpx = sum(w * h for w, h in sizes) / n / 1e6
    print(
        f"\n{n} JPEGs, {sum(os.path.getsize(p) for p in paths) / n / 1024:.0f} KiB and {mpx:.2f} Mpixel mean, cut to "
        f"max side {args.max_side}; "
        f"{os.cpu_count()} CPU cores; img2dataset {args.processes} processes x {args.threads} threads, "
        f"{args.per_shard} per shard"
    )
    rows = [
        ("(a) sequential urllib + decode/resize/encode", seq),
        (f"(b) {args.threads} threads, same work", thr),
        ("(c) abpipe ingest cc12m, end to end", ours),
    ]
    head = f"{'method':<48} | {'seconds':>8} | {'images/s':>9} | {'vs (a)':>6}"
    print(head)
    print("-" * len(head))
    for name, secs in rows:
        print(f"{name:<48} | {secs:>8.2f} | {n / secs:>9.1f} | {seq / secs:>6.2f}")
    print(
        f"{'    img2dataset workers only (its stats files)':<48} | {n / workers:>8.2f} | {workers:>9.1f} | "
        f"{workers / (n / seq):>6.2f}"
    )
    if local is not None:
        print(
            f"{'(d) local image-folder ingest (Ray), no HTTP':<48} | {local:>8.2f} | {n / local:>9.1f} | "
            f"{seq / local:>6.2f}"
        )


if __name__ == "__main__":
    main()
