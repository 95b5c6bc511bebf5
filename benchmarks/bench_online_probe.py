"""The online probe's cost: the real training loop's step rate with `train.online_probe` on, against the
same loop without it, on the same config, batch and threads (bench_train_loop.py's timing window).

The probe's labelled set is scikit-learn's digits (written as a class folder once, `--per-class`
images per class and split); with `--every` steps between probes, a window of `--steps` steps holds
steps / every probe calls, so the ratio is the amortised cost a run pays. Rounds alternate.

    python benchmarks/bench_online_probe.py --config jobs/configs/tiny.yaml --steps 100 --every 50 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_train_loop import loop_rate  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.sample_data import write_digits_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/tiny.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        digits = write_digits_folder(os.path.join(tmp, "digits"), size=cfg.views.view_size)
        probe = dataclasses.replace(
            cfg.train.online_probe, root=str(digits), every_steps=args.every, max_per_class=args.per_class
        )
        probed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, online_probe=probe))
        plain_rates, probed_rates = [], []
        for r in range(args.rounds):
            plain_rates.append(loop_rate(cfg, args.batch, args.steps, device))
            probed_rates.append(loop_rate(probed, args.batch, args.steps, device))
            ratio = probed_rates[-1] / plain_rates[-1]
            print(f"round {r + 1}: loop {plain_rates[-1]:.3f} steps/s, with probe {probed_rates[-1]:.3f}, {ratio:.3f}")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    plain, with_probe = statistics.median(plain_rates), statistics.median(probed_rates)
    print(
        f"\n{cfg.model.encoder} {cfg.views.view_size}px, batch {args.batch}, {args.steps} steps x {args.rounds} "
        "rounds, "
        f"probe every {args.every} steps on {args.per_class} digits per class and split, {dev}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| loop | steps/s (median) | ratio |\n|---|---|---|")
    print(f"| train.loop.train | {plain:.3f} | 1.000 |")
    print(f"| + train.online_probe | {with_probe:.3f} | {with_probe / plain:.3f} |")


if __name__ == "__main__":
    main()
