"""Ingest throughput per source (images/s) next to a decode-only baseline of the same inputs.

Generated data, nothing downloaded: `--images` real photos (scikit-image) re-encoded at 640x480 as
an image folder and as a COCO set (same files + a json with boxes), and one EPIC-shaped video of
`--frames` frames at 456x256 (EPIC's rgb_frames size) as an H.264 mp4 and as an rgb_frames tar.
  ingest:  write_shards on a local Ray instance (`--cpus` CPUs), listing included, the second of
           two runs into a fresh folder (the first starts Ray's workers), max_side 384;
  decode:  the same inputs decoded in this one process, nothing else (image files: Pillow; mp4:
           PyAV, one sequential pass; tar: read members + Pillow): what one core does at best.
The ratio says how many decode-only cores the whole ingest (validate, resize, JPEG encode, tar
write, manifest) is worth.

    .venv/bin/python benchmarks/bench_ingest.py --images 400 --frames 600
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import CocoIngestConfig, EpicIngestConfig, IngestConfig, RayConfig  # noqa: E402
from pipeline.data.sample_data import photo_arrays  # noqa: E402
from pipeline.data.schema import decode_rgb  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.sources import coco, epic_kitchens  # noqa: E402
from pipeline.data.sources.frames import iter_video_frames  # noqa: E402
from pipeline.data.sources.image_folder import list_image_folder  # noqa: E402
from pipeline.data.synthetic_video import write_rgb_frames_tar, write_video  # noqa: E402


def make_images(root: str, n: int) -> tuple[str, str]:
    """n JPEGs (640x480) in 4 class folders, plus a COCO instances json over the same files."""
    from PIL import Image

    photos = list(photo_arrays().values())
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        rel = f"c{i % 4}/img{i:05d}.jpg"
        os.makedirs(os.path.join(root, "images", f"c{i % 4}"), exist_ok=True)
        Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((640, 480)).save(
            os.path.join(root, "images", rel), quality=90
        )
        images.append({"id": i, "file_name": rel, "width": 640, "height": 480})
        for j in range(3):
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            anns.append(
                {
                    "id": 3 * i + j,
                    "image_id": i,
                    "category_id": 1 + j,
                    "bbox": [x, y, 100.0, 80.0],
                    "iscrowd": 0,
                    "area": 8000.0,
                }
            )
    instances = os.path.join(root, "instances.json")
    with open(instances, "w") as fh:
        json.dump(
            {"images": images, "annotations": anns, "categories": [{"id": k, "name": f"cat{k}"} for k in (1, 2, 3)]}, fh
        )
    return os.path.join(root, "images"), instances


def timed_ingest(items_of, out: str, cfg: IngestConfig, source: str) -> tuple[int, float]:
    """(kept samples, seconds) of listing + write_shards, second of two runs into a fresh folder."""
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        stats = write_shards(items_of(), out, source, cfg)
        seconds = time.perf_counter() - t0
    return stats["counts"]["ok"], seconds


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def decode_files(paths: list[str]) -> int:
    for p in paths:
        with open(p, "rb") as fh:
            decode_rgb(fh.read())
    return len(paths)


def decode_video(path: str, n: int) -> int:
    return sum(1 for _, frame in iter_video_frames(path, range(n)) if isinstance(frame, np.ndarray))


def decode_tar(path: str) -> int:
    count = 0
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                decode_rgb(tar.extractfile(member).read())
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--per-shard", type=int, default=100)
    args = parser.parse_args()

    from pipeline.runtime import init_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = tempfile.mkdtemp(prefix="abpipe-bench-ingest-")
    try:
        images_dir, instances = make_images(work, args.images)
        epic_root = os.path.join(work, "epic")
        video = str(write_video(os.path.join(epic_root, "P01", "videos", "P01_01.MP4"), args.frames, 456, 256, gop=50))
        tar = str(
            write_rgb_frames_tar(os.path.join(epic_root, "P01", "rgb_frames", "P01_01.tar"), args.frames, 456, 256)
        )
        ray = init_ray(RayConfig(num_cpus=args.cpus))
        ray.data.DataContext.get_current().enable_progress_bars = False
        base = dict(max_side=384, samples_per_shard=args.per_shard)
        folder_cfg = IngestConfig(source="image_folder", input=images_dir, **base)
        coco_cfg = IngestConfig(source="coco", input=images_dir, coco=CocoIngestConfig(instances=instances), **base)
        mp4_cfg = IngestConfig(
            source="epic_kitchens", input=epic_root, epic=EpicIngestConfig(frame_stride=1, layout="videos"), **base
        )
        tar_cfg = IngestConfig(
            source="epic_kitchens", input=epic_root, epic=EpicIngestConfig(frame_stride=1, layout="rgb_frames"), **base
        )
        files = [item["input"] for item in list_image_folder(images_dir)]
        rows = [
            (
                "image_folder",
                timed_ingest(
                    lambda: list_image_folder(images_dir), os.path.join(work, "o1"), folder_cfg, "image_folder"
                ),
                timed(lambda: decode_files(files)),
            ),
            (
                "coco",
                timed_ingest(lambda: coco.list_items(coco_cfg), os.path.join(work, "o2"), coco_cfg, "coco"),
                timed(lambda: decode_files(files)),
            ),
            (
                "epic (mp4)",
                timed_ingest(
                    lambda: epic_kitchens.list_items(mp4_cfg), os.path.join(work, "o3"), mp4_cfg, "epic_kitchens"
                ),
                timed(lambda: decode_video(video, args.frames)),
            ),
            (
                "epic (rgb_frames tar)",
                timed_ingest(
                    lambda: epic_kitchens.list_items(tar_cfg), os.path.join(work, "o4"), tar_cfg, "epic_kitchens"
                ),
                timed(lambda: decode_tar(tar)),
            ),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ningest throughput, {args.cpus} Ray CPUs, max_side 384, {args.per_shard} samples/shard (decode-only: 1 "
        "core, same inputs)"
    )
    print("| source | images | ingest s | ingest img/s | decode-only img/s | ingest / decode |")
    print("|---|---|---|---|---|---|")
    for name, (n, secs), (dn, dsecs) in rows:
        ingest_rate, decode_rate = n / secs, dn / dsecs
        print(
            f"| {name} | {n} | {secs:.2f} | {ingest_rate:,.0f} | {decode_rate:,.0f} | {ingest_rate / decode_rate:.2f} |"
        )


if __name__ == "__main__":
    main()
