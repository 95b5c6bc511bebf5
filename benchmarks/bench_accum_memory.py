"""Peak memory and time of one train step with `train.accum_steps` K = 1, 2, 4 (docs/training.md#gradient-accumulation).

Each K runs in its own process: the real TrainStep (fp32, grad_clip 1, fused AdamW, EMA teacher) on a fixed
synthetic batch of `--batch` images, after one warm-up step (which allocates the gradients and AdamW's moments).
On the CPU the figure is the resident-set high-water mark (`VmHWM`, reset through /proc/self/clear_refs after
the warm-up) above the resident set before the timed steps, with glibc's malloc told to give every block of
64 KiB or more back to the system when freed (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live
tensors; on CUDA, torch's `max_memory_allocated` above the allocated memory before the steps.

    python benchmarks/bench_accum_memory.py                       # ViT-Ti/16, 48 px, batch 64, AB_SimCLR, CPU
    python benchmarks/bench_accum_memory.py --method simclr --ks 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from pipeline.config import (  # noqa: E402
    Config,
    ModelConfig,
    ObjectiveConfig,
    TextViewsConfig,
    TrainConfig,
    ViewsConfig,
)

# views.num_views, views.annotation_views per method
LAYOUT = {"ab_simclr": (4, 2), "simclr": (0, 2), "clip": (0, 1), "ab_clip": (4, 1), "mae": (1, 0)}
CONTEXT = 32


def bench_config(args, k: int) -> Config:
    m, a = LAYOUT[args.method]
    text = TextViewsConfig(source="captions", context_length=CONTEXT) if "clip" in args.method else TextViewsConfig()
    views = ViewsConfig(num_views=m, annotation_views=a, view_size=args.view_size, text=text)
    model = ModelConfig(encoder=args.encoder, proj_dim=256, proj_hidden_dim=1024, decoder_heads=3)
    per_step = args.batch * (m + a)
    train = TrainConfig(
        total_views=100 * per_step, batch_size=args.batch, precision="fp32", accum_steps=k, warmup_fraction=0.0
    )
    return Config(views=views, model=model, objective=ObjectiveConfig(name=args.method), train=train)


def synthetic_batch(cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, v, s = cfg.train.batch_size, cfg.views, cfg.views.view_size
    lo = torch.rand(b, max(v.num_views, 1), 2, generator=g) * 0.5
    batch = {
        "views": torch.randint(0, 256, (b, max(v.num_views, 1), s, s, 3), dtype=torch.uint8, generator=g),
        "boxes": torch.cat([lo, lo + 0.25 + 0.25 * torch.rand(lo.shape, generator=g)], dim=-1),
        "ann_views": torch.randint(0, 256, (b, max(v.annotation_views, 1), s, s, 3), dtype=torch.uint8, generator=g),
        "tokens": torch.randint(1, 400, (b, CONTEXT), generator=g),
    }
    return {key: t.to(device) for key, t in batch.items()}


def status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{key}:\s+(\d+) kB", fh.read()).group(1))


def child(args) -> dict:
    from pipeline.objectives.registry import build_objective
    from pipeline.train.step import Budget, TrainStep, make_optimizer, peak_lr

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = bench_config(args, args.child)
    objective = build_objective(cfg).to(device).train()
    optimizer = make_optimizer(objective, peak_lr(cfg, 1), cfg.train.weight_decay)
    step = TrainStep(cfg, objective, objective, optimizer, Budget.from_config(cfg, 1), device)
    batch = synthetic_batch(cfg, device)
    params = sum(p.numel() for p in objective.parameters())
    step(batch, 0, logging=False, diagnose=False)  # warm-up: gradients and AdamW state now exist
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
    times, cpu_times, losses = [], [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        result = step(batch, i + 1, logging=False, diagnose=False)
        losses.append(result.out.loss.item())  # a host sync: the step is done
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    return {
        "k": args.child,
        "base_mib": base / 2**20,
        "peak_mib": peak / 2**20,
        "step_mib": (peak - base) / 2**20,
        "s_per_step": min(times),
        "s_per_step_mean": sum(times) / len(times),
        "cpu_s_per_step": min(cpu_times),  # this process's CPU time: what a busy host distorts least
        "loss": losses[0],
        "params_m": params / 1e6,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="ab_simclr", choices=sorted(LAYOUT))
    ap.add_argument("--encoder", default="vit_tiny_patch16_224")
    ap.add_argument("--view-size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(k)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    m, a = LAYOUT[args.method]
    what = "allocated" if args.device.startswith("cuda") else "resident"
    print(
        f"\n{args.method}, {args.encoder} ({rows[0]['params_m']:.1f} M params with teacher and heads) at "
        f"{args.view_size} px, batch {args.batch} x ({m} crops + {a} annotation views), {args.device} "
        f"({rows[0]['threads']} threads), fp32; step memory = peak {what} memory during a step above the memory "
        "before it (weights, gradients, AdamW state)"
    )
    print("| K | sub-batch | step memory MiB | peak MiB | s/step (best) | CPU s/step (best) | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['k']} | {args.batch // r['k']} | {r['step_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['s_per_step']:.2f} | {r['cpu_s_per_step']:.2f} | {r['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
