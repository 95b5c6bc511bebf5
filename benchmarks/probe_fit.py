"""Does the decoder probe fit? Train it on a study's cached features with several budgets; train / test top-1.

Reads the feature cache an `abpipe study` run left under its root (`<root>/feature_cache`), matches each
cached encoder to the task's train and test splits, and fits the decoder probe of `pipeline.eval.probes`
for every (steps, lr, geometry) of `--grid`, printing the final training loss and top-1 on train and test.
A probe whose *training* accuracy stays near chance on random-init features measures itself, not the
encoder (docs/study.md).

    python benchmarks/probe_fit.py --root /work/study/root --task coco_objects \\
        --grid 400:1e-3:0,2000:1e-3:0,400:1e-3:1,1000:1e-3:1 --models random,sha256:aec
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.eval.cache import CacheKey, FeatureCache, digest  # noqa: E402
from pipeline.eval.job import _probe_split  # noqa: E402
from pipeline.eval.probes.decoder import evaluate_decoder, fit_decoder  # noqa: E402
from pipeline.eval.tasks import load_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the study's paths.root")
    ap.add_argument("--task", default="coco_objects")
    ap.add_argument("--data", default="data/scenes_fashion_mnist/scenes", help="the task's dataset, under --root")
    ap.add_argument("--max-per-split", type=int, default=4000)
    ap.add_argument("--grid", default="400:1e-3:0,1000:1e-3:1", help="steps:lr:geometry, comma-separated")
    ap.add_argument("--models", default="", help="prefixes of the cached models' fingerprints to fit (default all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ev = EvalConfig()
    data = load_task(args.task, os.path.join(args.root, args.data), max_per_split=args.max_per_split, seed=ev.seed)
    cache = FeatureCache(f"{args.root}/feature_cache")
    found: dict[str, dict[str, CacheKey]] = {}  # the cache's entries of this task's splits, by model
    for split in ("train", "test"):
        inputs = digest([str(ex.input) for ex in getattr(data, split)])
        for meta_path in glob.glob(f"{args.root}/feature_cache/{args.task}/{split}/*/meta.json"):
            meta = json.load(open(meta_path))
            key = CacheKey(**meta["key"])
            if key.inputs == inputs and meta.get("has_tokens"):
                found.setdefault(key.model[:20], {})[split] = key

    def split_of(key: CacheKey, split: str):
        feats = cache.get(key, need_tokens=True)  # the eval job's own reader: checked, memory-mapped
        if feats is None:
            raise SystemExit(f"feature cache entry {key.id} of {key.model[:20]} has no tokens or is damaged")
        return _probe_split(getattr(data, split), feats.kept, feats.pooled, feats.tokens, data.info.kind)

    grid = [
        {"steps": int(s), "lr": float(lr), "geometry": bool(int(g))}
        for s, lr, g in (item.split(":") for item in args.grid.split(","))
    ]
    prefixes = [p for p in args.models.split(",") if p]
    for name, folders in sorted(found.items()):
        if set(folders) != {"train", "test"} or (prefixes and not any(name.startswith(p) for p in prefixes)):
            continue
        train, test = split_of(folders["train"], "train"), split_of(folders["test"], "test")
        for setting in grid:
            cfg = dataclasses.replace(ev, probe=dataclasses.replace(ev.probe, **setting))
            t0 = time.perf_counter()
            model, vocab, _, losses = fit_decoder(train, data.info, cfg)
            on_train = evaluate_decoder(model, vocab, train, data.info, cfg)
            on_test = evaluate_decoder(model, vocab, test, data.info, cfg)
            key = "top1" if "top1" in on_test else "map"
            print(
                f"{name} {setting} train loss {np.mean(losses[-max(1, len(losses) // 10) :]):.3f} "
                f"train {key} {on_train[key]:.3f} test {key} {on_test[key]:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
