"""Object storage vs local disk for the two writes that go to storage: ingest and checkpoints.

Both rows of each pair run the same code on the same inputs in the same process, local first then
S3, then again in the other order (the table shows each row's best of the two):
  ingest      `write_shards` (one Ray Data task per shard, as `abpipe ingest`) of scikit-image's
              photos into a fresh local folder vs a fresh s3:// prefix;
  checkpoint  what Ray Train does with a reported checkpoint: `pyarrow.fs.copy_files` of a folder
              written by `save_checkpoint` (weights + AdamW state of the `--model` config's
              objective) to local storage vs s3://, then the resumed run's copy back.
The S3 server is moto's (tests/servers.py) on 127.0.0.1, IAM auth on, credentials from the
environment: the ratio is the client-side cost of the S3 path (signing, multipart uploads,
listings, an emulator's request handling on the same cores), not a real network's.

    .venv/bin/python benchmarks/bench_storage.py --images 240 --model jobs/configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.servers import BUCKET, S3_ENV, S3Server

os.environ.update(S3_ENV)  # before Ray starts: its workers inherit the credentials


def ingest_once(items: list[dict], out: str) -> float:
    from pipeline.config import IngestConfig
    from pipeline.data.shards import write_shards

    started = time.perf_counter()
    stats = write_shards(items, out, "files", IngestConfig(max_side=256, samples_per_shard=20))
    assert stats["counts"]["ok"] == len(items), stats["counts"]
    return time.perf_counter() - started


def checkpoint_folder(config: str, directory: str) -> int:
    """A real checkpoint of `config`'s objective (weights, AdamW moments after one step); its bytes."""
    import torch

    from pipeline.checkpoints import save_checkpoint
    from pipeline.config import load_config
    from pipeline.objectives.registry import build_objective

    cfg = load_config(config).resolved()
    objective = build_objective(cfg)
    optimizer = torch.optim.AdamW(objective.parameters())
    for p in objective.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    save_checkpoint(
        directory,
        {"objective": objective.state_dict(), "optimizer": optimizer.state_dict()},
        {"step": 1, "config": cfg.to_dict()},
    )
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def copy_once(src: str, uri: str, back: str) -> tuple[float, float]:
    """(upload s, download s) of a checkpoint folder through the storage filesystem."""
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem

    fs, path = filesystem(uri)
    local = pafs.LocalFileSystem()
    started = time.perf_counter()
    fs.create_dir(path, recursive=True)
    pafs.copy_files(src, path, source_filesystem=local, destination_filesystem=fs)
    up = time.perf_counter() - started
    local.create_dir(back, recursive=True)  # copy_files writes into an existing folder
    started = time.perf_counter()
    pafs.copy_files(path, back, source_filesystem=fs, destination_filesystem=local)
    return up, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--model", default="jobs/configs/tiny.yaml", help="config whose objective is checkpointed")
    parser.add_argument("--checkpoint-copies", type=int, default=3, help="uploads per row (best kept)")
    args = parser.parse_args()

    from pipeline.config import RayConfig
    from pipeline.data.sample_data import write_photo_files
    from pipeline.runtime import init_ray

    s3 = S3Server().start()
    tmp = tempfile.mkdtemp(prefix="abpipe-bench-storage-")
    try:
        init_ray(RayConfig(num_cpus=2, temp_dir=os.path.join(tmp, "ray")))
        photos = write_photo_files(os.path.join(tmp, "photos"), copies=max(1, args.images // 10), max_side=512)
        items = [{"input": str(p), "id": f"{i}"} for i, p in enumerate(photos[: args.images])]
        ingest_once(items[:20], os.path.join(tmp, "warmup"))  # Ray Data's first execution starts its workers
        ingest = {"local": [], "s3": []}
        for round_, order in enumerate((("local", "s3"), ("s3", "local"))):
            for where in order:
                out = (
                    os.path.join(tmp, f"shards-{round_}")
                    if where == "local"
                    else f"s3://{BUCKET}/bench/shards-{round_}"
                )
                ingest[where].append(ingest_once(items, out))

        src = os.path.join(tmp, "ckpt")
        size = checkpoint_folder(args.model, src)
        ckpt = {"local": [], "s3": []}
        for i in range(args.checkpoint_copies):
            for where in ("local", "s3") if i % 2 == 0 else ("s3", "local"):
                uri = os.path.join(tmp, "storage", f"c{i}") if where == "local" else f"s3://{BUCKET}/bench/ckpt-{i}"
                ckpt[where].append(copy_once(src, uri, os.path.join(tmp, "back", f"{where}{i}")))
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    best = {k: min(v) for k, v in ingest.items()}
    up = {k: min(u for u, _ in v) for k, v in ckpt.items()}
    down = {k: min(d for _, d in v) for k, v in ckpt.items()}
    rows = [
        ("ingest", f"{len(items)} photos, {len(items) // 20} shards", best["local"], best["s3"]),
        ("checkpoint upload", f"{size / 2**20:.1f} MiB ({os.path.basename(args.model)})", up["local"], up["s3"]),
        ("checkpoint download", f"{size / 2**20:.1f} MiB", down["local"], down["s3"]),
    ]
    print(
        f"# bench_storage {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} CPUs); "
        "S3 = moto on 127.0.0.1"
    )
    print(f"{'write':<22}{'what':<34}{'local s':>9}{'s3 s':>9}{'s3/local':>10}")
    for name, what, local, remote in rows:
        print(f"{name:<22}{what:<34}{local:>9.2f}{remote:>9.2f}{remote / local:>10.2f}")
    print(json.dumps({"ingest_s": ingest, "checkpoint_up_down_s": ckpt, "checkpoint_bytes": size}))


if __name__ == "__main__":
    main()
