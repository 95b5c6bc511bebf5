"""The real training loop's step rate against the bare AB_SimCLR step, on the same config and batch.

The bare step is bench_train_step.py's (forward, backward, clip, AdamW, EMA on one fixed batch). The
real loop is `pipeline.train.loop.train` on a LocalSession fed that batch from memory: schedules,
the device-side skip of non-finite steps, logging every `train.log_every_steps` (diagnostics included,
MLflow off) and everything else a training worker does per step. Its steady-state rate is timed
between batch fetches (model building and the final checkpoint are outside the window). The two
alternate over several rounds on the same threads; the medians and their ratio are printed.

    python benchmarks/bench_train_loop.py --config jobs/configs/tiny.yaml --batch 64 --steps 50 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_train_step import make_ab_step  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.train.loop import train  # noqa: E402
from pipeline.train.session import LocalSession  # noqa: E402


class TimedBatches:
    """The same batch `n` times, noting the time at the fetches numbered in `marks` (the device caught up
    first, so only those two fetches wait for it)."""

    def __init__(self, batch: dict, n: int, marks: tuple[int, int]):
        self.batch, self.n, self.marks, self.times = batch, n, marks, []

    def __iter__(self):
        for i in range(self.n):
            if i in self.marks:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())
            yield self.batch


def bare_rate(cfg, b: int, steps: int, device) -> float:
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    ab_step, *_ = make_ab_step(cfg, b, device, autocast)
    for _ in range(3):
        ab_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        ab_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def loop_rate(cfg, b: int, steps: int, device, warmup: int = 3) -> float:
    from bench_train_step import synthetic_batch

    crops, boxes, ann = synthetic_batch(b, cfg.views.num_views, cfg.views.annotation_views, cfg.views.view_size, device)
    views_per_step = b * (cfg.views.num_views + cfg.views.annotation_views)
    total = warmup + steps + 1
    train_cfg = dataclasses.replace(
        cfg.train,
        batch_size=b,
        total_views=total * views_per_step,
        checkpoint_every_steps=10**9,
        num_workers=1,
        cpus_per_worker=torch.get_num_threads(),
        use_gpu=device.type == "cuda",
    )
    run_cfg = dataclasses.replace(cfg, train=train_cfg).resolved()
    data = TimedBatches({"views": crops, "boxes": boxes, "ann_views": ann}, total, marks=(warmup, warmup + steps))
    train(run_cfg, LocalSession({"train": data}))
    return steps / (data.times[1] - data.times[0])  # from the fetch of step `warmup` to that of `warmup + steps`


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/tiny.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bare, loop = [], []
    for r in range(args.rounds):
        bare.append(bare_rate(cfg, args.batch, args.steps, device))
        loop.append(loop_rate(cfg, args.batch, args.steps, device))
        print(
            f"round {r + 1}: bare {bare[-1]:.2f} steps/s, loop {loop[-1]:.2f} steps/s, ratio {loop[-1] / bare[-1]:.3f}",
            flush=True,
        )
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    b, l = statistics.median(bare), statistics.median(loop)
    print(
        f"\n{cfg.model.encoder} {cfg.views.view_size}px, batch {args.batch}, {args.steps} steps x {args.rounds} "
        f"rounds, {dev}, "
        f"log every {cfg.train.log_every_steps} steps, load average {os.getloadavg()[0]:.1f}"
    )
    print("| step | steps/s (median) | ratio |\n|---|---|---|")
    print(f"| bare AB_SimCLR step (bench_train_step) | {b:.2f} | 1.000 |")
    print(f"| real loop (train.loop.train, LocalSession) | {l:.2f} | {l / b:.3f} |")


if __name__ == "__main__":
    main()
