"""Probe cost at the default `eval.probe.*` settings, on random features of a ViT-S-like shape.

Random tokens (so the numbers are cost, not quality): `--images` images, `--tokens` tokens of
`--dim` float16 features, `--classes` classes, 0-5 random boxes per image. Each probe is trained on
the split and scored on the same split. CPU seconds are the column to compare on a shared machine;
the ratio is against the linear probe's CPU time.

    .venv/bin/python benchmarks/bench_probes.py --images 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.eval.probe_data import ProbeSplit, TaskInfo  # noqa: E402
from pipeline.eval.probes import PROBES  # noqa: E402

RUNS = [
    ("linear", "classification"),  # first: the baseline of the ratio column
    ("box_linear", "box_classification"),
    ("knn", "classification"),
    ("rankme", "classification"),
    ("attentive", "classification"),
    ("decoder", "classification"),
    ("decoder", "box_classification"),
    ("decoder", "detection"),
]


def random_split(n: int, tokens: int, dim: int, classes: int, rng) -> ProbeSplit:
    tok = rng.normal(size=(n, tokens, dim)).astype(np.float16)
    boxes, box_labels = [], []
    for k in rng.integers(0, 6, n):
        lo, hi = rng.uniform(0, 0.5, (k, 2)), rng.uniform(0.5, 1, (k, 2))
        boxes.append(np.concatenate([lo, hi], 1).astype(np.float32))
        box_labels.append(rng.integers(0, classes, k))
    return ProbeSplit(
        pooled=tok.mean(1).astype(np.float32),
        tokens=tok,
        labels=rng.integers(0, classes, n),
        boxes=boxes,
        box_labels=box_labels,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=65)  # 8 x 8 patches + class token
    ap.add_argument("--dim", type=int, default=384)  # ViT-S
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probes", default="", help="comma-separated probes to time (default: all); linear always runs")
    args = ap.parse_args()
    only = set(args.probes.split(",")) | {"linear"} if args.probes else None
    import torch

    torch.set_num_threads(args.threads)
    split = random_split(args.images, args.tokens, args.dim, args.classes, np.random.default_rng(0))
    names = [str(i) for i in range(args.classes)]
    rows = []
    for probe, kind in RUNS:
        if only is not None and probe not in only:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        PROBES[probe](split, split, TaskInfo("bench", kind, names), EvalConfig())
        rows.append((probe, kind, time.perf_counter() - wall, time.process_time() - cpu))
    base = rows[0][3]
    print(
        f"{args.images} images x {args.tokens} tokens x {args.dim}-d, {args.classes} classes, torch threads "
        f"{args.threads}"
    )
    print(f"| {'probe':<10} | {'task kind':<19} | {'wall s':>7} | {'cpu s':>7} | {'cpu / linear':>12} |")
    print(f"|{'-' * 12}|{'-' * 21}|{'-' * 9}|{'-' * 9}|{'-' * 14}|")
    for probe, kind, w, c in rows:
        print(f"| {probe:<10} | {kind:<19} | {w:>7.1f} | {c:>7.1f} | {c / base:>12.1f} |")


if __name__ == "__main__":
    main()
