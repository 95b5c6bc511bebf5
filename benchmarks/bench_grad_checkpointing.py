"""Memory and step time of `model.grad_checkpointing` on vs off, one fresh subprocess per setting.

The step is the real AB_SimCLR objective (`build_objective`: student, EMA teacher, both losses), then backward,
gradient clipping, AdamW and the EMA update, on one fixed synthetic batch. Each child process measures:

- `s/step`: the mean wall time of `--steps` steps after `--warmup` untimed ones, and `CPU s/step` the process's
  CPU time (user + system) over the same steps: on a shared host the CPU time is the steadier figure;
- `held MiB`: the CPU memory allocated in the forward pass and still live when the backward pass starts
  (activations kept for it, checkpoint inputs included), and `step peak MiB`: the peak of live allocations over
  the whole step, both from the torch profiler's memory events of one profiled step, counted from its start (the
  previous step's gradients are already freed there);
- `peak RSS MiB`: the process's maximum resident set (`ru_maxrss`), and its rise over the RSS before the
  first step.

Settings run in separate processes so one's memory high-water mark cannot hide the other's; with `--rounds 2`
they alternate off, on, on, off so a drift in a shared host's load falls on both.

    python benchmarks/bench_grad_checkpointing.py                      # ViT-Ti/8 at 48 px, batch 64, CPU
    python benchmarks/bench_grad_checkpointing.py --rounds 2 --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODEL = {  # ViT-Ti (192 wide, 12 blocks, 3 heads) with 8 px patches: 36 tokens + class token at 48 px
    "encoder": "vit_tiny_patch16_224",
    "encoder_kwargs": {"patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "decoder_depth": 2,
    "decoder_heads": 3,
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import Config, ModelConfig, ObjectiveConfig, ViewsConfig
    from pipeline.objectives.base import Progress
    from pipeline.objectives.registry import build_objective

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(
        model=ModelConfig(**MODEL, grad_checkpointing=args.child == "on"),
        views=ViewsConfig(num_views=args.crops, view_size=args.size, annotation_views=2),
        objective=ObjectiveConfig(name="ab_simclr"),
    )
    objective = build_objective(cfg)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, m, s = args.batch, args.crops, args.size
    lo = torch.rand(b, m, 2, generator=g) * 0.5
    batch = {
        "views": torch.randint(0, 256, (b, m, s, s, 3), dtype=torch.uint8, generator=g),
        "boxes": torch.cat([lo, lo + 0.25 + 0.25 * torch.rand(b, m, 2, generator=g)], dim=-1),
        "ann_views": torch.randint(0, 256, (b, 2, s, s, 3), dtype=torch.uint8, generator=g),
    }

    def step(i: int) -> float:
        out = objective(batch, Progress(i, 1000, 0.004))
        with torch.profiler.record_function("abpipe_backward"):
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        objective.after_step(Progress(i, 1000, torch.tensor(0.004)))
        opt.zero_grad(set_to_none=True)  # here, so a step starts without gradients
        return out.loss.item()

    rss_before = rss_mib()
    for i in range(args.warmup):
        step(i)
    times, cpu_times, losses = [], [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(args.warmup + i))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0)
    events = list(prof.profiler.kineto_results.events())
    backward_start = min(e.start_ns() for e in events if e.name() == "abpipe_backward")
    live = peak = held = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() >= backward_start and not held:
            held = live
        live += e.nbytes()
        peak = max(peak, live)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "setting": args.child,
        "s_per_step": statistics.mean(times),
        "s_per_step_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
        "cpu_s_per_step": statistics.mean(cpu_times),
        "loss_first_timed": losses[0],
        "held_mib": held / 2**20,
        "step_peak_mib": peak / 2**20,
        "peak_rss_mib": maxrss,
        "rss_rise_mib": maxrss - rss_before,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--crops", type=int, default=3, help="views.num_views (M); 2 annotation views")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="off,on per round, every other round on,off")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    ap.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for r in range(args.rounds):
        for setting in ("off", "on") if r % 2 == 0 else ("on", "off"):
            cmd = [sys.executable, __file__, "--child", setting]
            cmd += ["--batch", str(args.batch), "--size", str(args.size), "--crops", str(args.crops)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    keys = ("s_per_step", "cpu_s_per_step", "held_mib", "step_peak_mib", "peak_rss_mib", "rss_rise_mib")
    mean = {s: {k: statistics.mean(r[k] for r in rows if r["setting"] == s) for k in keys} for s in ("off", "on")}
    losses = {r["setting"]: r["loss_first_timed"] for r in rows}
    print(
        f"\nab_simclr step, ViT-Ti/8 at {args.size} px, batch {args.batch} images x ({args.crops} crops + 2 "
        f"annotation views), CPU {rows[0]['threads']} threads, {args.steps} timed steps x {args.rounds} round(s); "
        f"first timed loss off {losses['off']:.6f} / on {losses['on']:.6f}"
    )
    print(
        "| grad_checkpointing | s/step | CPU s/step | held for backward MiB | step peak MiB | peak RSS MiB | "
        "RSS rise MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    formats = {"s_per_step": ".2f", "cpu_s_per_step": ".2f"}  # the rest: MiB, whole numbers
    for s in ("off", "on"):
        print(f"| {s} | " + " | ".join(format(mean[s][k], formats.get(k, ".0f")) for k in keys) + " |")
    print("| on / off | " + " | ".join(f"{mean['on'][k] / mean['off'][k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
