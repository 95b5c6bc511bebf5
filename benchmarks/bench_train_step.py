"""Train-step throughput and peak memory of AB_SimCLR, against a plain SimCLR step in the same run.

The baseline is the annotation loss alone (2 views per image through encoder + identity decoder),
i.e. what SimCLR costs on the same network; AB adds M crops, M^2 decoder queries and the EMA
teacher's forward passes. Views/s counts every crop and annotation view once, as the budget does.

    python benchmarks/bench_train_step.py --config jobs/configs/vit_s16.yaml --batch 64 --steps 10
    python benchmarks/bench_train_step.py --config jobs/configs/tiny.yaml --batch 64   # CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import load_config  # noqa: E402
from pipeline.models.ab_model import build_model, images_to_float  # noqa: E402
from pipeline.objectives.ab_simclr import ab_simclr_step  # noqa: E402
from pipeline.objectives.contrastive import symmetric_info_nce  # noqa: E402
from pipeline.objectives.ema import ema_update, make_teacher  # noqa: E402
from pipeline.train.step import autocast_dtype, compile_blocks  # noqa: E402


def synthetic_batch(b: int, m: int, a: int, size: int, device):
    crops = torch.randint(0, 256, (b, m, size, size, 3), dtype=torch.uint8, device=device)
    lo = torch.rand(b, m, 2, device=device) * 0.5
    boxes = torch.cat([lo, lo + 0.25 + 0.25 * torch.rand(b, m, 2, device=device)], dim=-1)
    ann = torch.randint(0, 256, (b, a, size, size, 3), dtype=torch.uint8, device=device)
    return crops, boxes, ann


def make_ab_step(cfg, b: int, device, autocast, compiled: bool = False):
    """The bare AB_SimCLR step: forward, backward, clip, AdamW, EMA on one fixed batch (no loop around it)."""
    torch.manual_seed(0)
    student = build_model(cfg.model, cfg.views.view_size).to(device)
    teacher = make_teacher(student)
    if compiled:  # as train.compile: the blocks, in place (a compiled encoder module is bypassed by forward_features)
        compile_blocks(student)
        compile_blocks(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    crops, boxes, ann = synthetic_batch(b, cfg.views.num_views, cfg.views.annotation_views, cfg.views.view_size, device)

    def ab_step():
        with autocast:
            out = ab_simclr_step(student, teacher, crops, boxes, ann, cfg.objective)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(teacher, student, 0.004)

    return ab_step, student, opt, (crops, boxes, ann)


def measure(name, step_fn, views_per_step, steps, device):
    for _ in range(3):  # warm-up (and compilation)
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"name": name, "s_per_step": dt, "views_per_s": views_per_step / dt, "peak_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/tiny.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off")
    # train.precision's autocast; fp16 needs the TrainStep's GradScaler, which this bare step does not have
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = autocast_dtype(args.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    b, m, a, size = args.batch, cfg.views.num_views, cfg.views.annotation_views, cfg.views.view_size
    rows = []
    for compiled in [False, True] if args.compile == "both" else [args.compile == "on"]:
        ab_step, student, opt, (crops, boxes, ann) = make_ab_step(cfg, b, device, autocast, compiled)

        def simclr_step():
            with autocast:
                z = student.embed(images_to_float(ann).flatten(0, 1)).view(b, a, -1)
                loss = symmetric_info_nce(z[:, 0], z[:, 1], 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()

        tag = " +compile" if compiled else ""
        rows.append(measure(f"SimCLR step (baseline){tag}", simclr_step, b * a, args.steps, device))
        rows.append(measure(f"AB_SimCLR step (M={m}){tag}", ab_step, b * (m + a), args.steps, device))

    base = rows[0]["views_per_s"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nTrain step, {cfg.model.encoder} {size}px, batch {b} images, {dev}, "
        f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}"
    )
    print(f"| {'step':34s} | {'s/step':>8s} | {'views/s':>9s} | {'ratio vs SimCLR':>15s} | {'peak GiB':>8s} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 17}|{'-' * 10}|")
    for r in rows:
        print(
            f"| {r['name']:34s} | {r['s_per_step']:8.4f} | {r['views_per_s']:9.1f} | {r['views_per_s'] / base:15.2f} | "
            f"{r['peak_gib']:8.2f} |"
        )


if __name__ == "__main__":
    main()
