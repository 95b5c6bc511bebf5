"""Ingest-to-trainer overhead: views/s reaching a Ray Train worker vs the crop stage read alone.

Both rows stream the same real JPEG shards (scikit-image photos, max side 384, written by
`write_shards`) through the same `build_training_datasets` the pretrain job uses:
  (a) crop stage alone: the driver iterates the crop dataset (`iter_batches`, numpy);
  (b) through Ray Train: a `TorchTrainer` with `--workers` workers whose loop does what
      `train_loop_per_worker` does to get data (`get_dataset_shard` -> `iter_torch_batches` with
      drop_last, uint8 tensors) and nothing else, so b/a is the cost of the split coordinator,
      the object-store hop and torch collation, not of a model.
Training workers take `train.cpus_per_worker` CPUs, which the crop stage then does not have, in
both rows (the crop pool is sized the same way), so the comparison is like for like.
Each row is one execution streaming `--passes` passes over the shards, as the trainer streams its
budget (`data.max_passes_per_execution`), after one warm-up execution; "steady" leaves out the time
to the first batch (the crop actors' start-up, paid once per execution).

    .venv/bin/python benchmarks/bench_end_to_end.py --images 400 --views 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import Config, DataConfig, RayConfig, TrainConfig, ViewsConfig  # noqa: E402
from pipeline.data.sample_data import write_photo_shards  # noqa: E402


def timed_runs(make_iter, views_of, runs: int = 1) -> tuple[float, float]:
    """(views/s over whole runs, views/s after each run's first batch), `runs` full iterations."""
    views = steady_views = 0
    wall = steady_wall = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        first = None
        for batch in make_iter():
            n = views_of(batch)
            views += n
            if first is None:
                first = time.perf_counter()
            else:
                steady_views += n
        end = time.perf_counter()
        wall += end - t0
        steady_wall += end - (first or end)
    return views / wall, (steady_views / steady_wall if steady_wall else float("nan"))


def batch_views(batch) -> int:
    return int(batch["views"].shape[0] * (batch["views"].shape[1] + batch["ann_views"].shape[1]))


def consume_in_ray_train(config: dict) -> None:
    """The data half of train_loop_per_worker: full uint8 batches as torch tensors, nothing else."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    batch_size = config["batch_size"]

    def execution():
        return shard.iter_torch_batches(batch_size=batch_size, drop_last=True)

    timed_runs(execution, batch_views)  # warm-up
    rate, steady = timed_runs(execution, batch_views)
    # Ray Train V2 keeps only metrics reported with a checkpoint: hand the figures back through a file
    # (the benchmark's Ray instance is local)
    with open(f"{config['out']}.{ray.train.get_context().get_world_rank()}", "w") as fh:
        json.dump({"views_per_s": rate, "steady_views_per_s": steady}, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--views", type=int, default=4, help="M")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=4, help="passes over the shards in one execution")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.runtime import init_ray

    ray = init_ray(RayConfig(num_cpus=args.cpus))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from ray.train.torch import TorchTrainer

    from pipeline.train.trainer import build_training_datasets

    work = tempfile.mkdtemp(prefix="abpipe-bench-e2e-")
    write_photo_shards(work, args.images, samples_per_shard=50)
    shards = os.path.join(work, "shards")

    cfg = Config(
        data=DataConfig(shards=shards, max_passes_per_execution=args.passes),
        views=ViewsConfig(num_views=args.views, view_size=args.size, batch_size=args.batch),
        # a budget of many passes: the stream is capped at --passes passes per execution
        train=TrainConfig(
            batch_size=args.batch,
            num_workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            run_name="bench-e2e",
            total_views=10**9,
        ),
    ).resolved()
    cluster_cpus = ray.cluster_resources()["CPU"]
    reserved = args.workers * args.cpus_per_worker

    # (a) the crop stage alone, with the same CPUs left to it as under Ray Train
    placeholder = ray.util.placement_group([{"CPU": reserved}])
    ray.get(placeholder.ready())
    crops = build_training_datasets(cfg, cluster_cpus)["train"]
    make_iter = lambda: crops.iter_batches(batch_size=args.batch, batch_format="numpy", drop_last=True)
    timed_runs(make_iter, batch_views)  # warm-up
    alone, alone_steady = timed_runs(make_iter, batch_views)
    ray.util.remove_placement_group(placeholder)

    # (b) the same stream consumed by Ray Train workers
    trainer = TorchTrainer(
        consume_in_ray_train,
        train_loop_config={"batch_size": args.batch // args.workers, "out": os.path.join(work, "rates")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": args.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(name="bench-e2e", storage_path=os.path.join(work, "ray_train")),
        datasets=build_training_datasets(cfg, cluster_cpus),
    )
    trainer.fit()
    rates = [json.load(open(os.path.join(work, f"rates.{rank}"))) for rank in range(args.workers)]
    train_rate, train_steady = (sum(r[k] for r in rates) for k in ("views_per_s", "steady_views_per_s"))

    per_image = cfg.views.num_views + cfg.views.annotation_views
    print(
        f"{args.images} JPEGs (max side 384) in shards, {args.passes} passes per execution; M = {args.views} + "
        f"{cfg.views.annotation_views} annotation views at "
        f"{args.size} px; batch {args.batch}; {args.workers} Ray Train worker(s) x {args.cpus_per_worker} CPU; "
        f"{cluster_cpus:g} CPUs"
    )
    head = f"{'path':<28} | {'views/s':>8} {'(steady)':>9} | {'img/s':>6} | {'vs crop stage':>13}"
    print(head)
    print("-" * len(head))
    print(
        f"{'(a) crop stage alone':<28} | {alone:>8.0f} {alone_steady:>9.0f} | {alone / per_image:>6.1f} | {1.0:>13.2f}"
    )
    print(
        f"{'(b) into Ray Train workers':<28} | {train_rate:>8.0f} {train_steady:>9.0f} | "
        f"{train_rate / per_image:>6.1f} | {train_rate / alone:>13.2f}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
