"""Box classification with a *linear* readout of the frozen tokens inside each box, for every cached encoder.

The study's box-classification column comes from the decoder probe (a transformer trained on the frozen
tokens), which reads the random-init encoder's tokens as well as the pretrained ones' (docs/study.md). This
asks the same question with a readout that cannot re-learn the features: the mean of the patch tokens whose
centres lie inside the box (the nearest patch for a box smaller than one), standardised on the training
boxes, then multinomial logistic regression (scikit-learn); the eval job's `box_linear` probe is the same pooling
with the linear probe's classifier, for new evaluations. A feature that already separates the objects
scores high here; a readout that only works after a trained decoder scores low.

Reads the feature cache an `abpipe study` left under its root, names each cached encoder by the study
checkpoint whose weights (or random-init recipe) it fingerprints (`<arm>-s<seed>`, the EMA teacher the eval
job reads by default, or `... student` where an eval with `eval.weights=student` cached the student's
features), and prints one line per encoder:

    python benchmarks/box_roi_probe.py --root /work/study/root
    python benchmarks/box_roi_probe.py --root /work/study/root --seeds 0 --probe-steps 1500  # box_linear's classifier
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.eval.cache import CacheKey, FeatureCache, digest  # noqa: E402
from pipeline.eval.probes.box_linear import roi_features  # noqa: E402  (the eval job's box_linear pooling)
from pipeline.eval.probes.linear import fit_linear  # noqa: E402
from pipeline.eval.tasks import load_task  # noqa: E402


def encoder_names(root: str) -> dict[str, str]:
    """fingerprint -> `<arm>-s<seed>` for every study checkpoint (the last one of each run), plus its random init."""
    from pipeline.checkpoints import weights_fingerprint
    from pipeline.eval.random_init import random_init_fingerprint
    from pipeline.models.encoder import load_frozen_model

    names: dict[str, str] = {}
    for run in sorted(glob.glob(f"{root}/ray_results/study-*-s*")):
        ckpts = sorted(glob.glob(f"{run}/checkpoint_[0-9]*"))
        if not ckpts:
            continue
        arm = os.path.basename(run).removeprefix("study-")
        names[weights_fingerprint(ckpts[-1])] = arm
        _, model_cfg = load_frozen_model(ckpts[-1], which="teacher")
        seed = re.search(r"-s(\d+)$", arm).group(1)
        names.setdefault(random_init_fingerprint(model_cfg), f"random-s{seed}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the study's paths.root")
    ap.add_argument("--data", default="data/scenes_fashion_mnist/scenes", help="the task's dataset, under --root")
    ap.add_argument("--max-per-split", type=int, default=4000)
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument(
        "--probe-steps",
        type=int,
        default=0,
        help="> 0: read out with the eval job's box_linear probe for this many full-batch steps instead",
    )
    ap.add_argument("--seeds", default="0,1,2", help="the study's seeds (each seed's eval samples its own splits)")
    args = ap.parse_args()
    cache = FeatureCache(f"{args.root}/feature_cache")
    names = encoder_names(args.root)
    readout = (
        f"box_linear probe ({args.probe_steps} steps)" if args.probe_steps else f"logistic regression (C={args.C})"
    )
    print(f"# box classification, ROI-mean tokens + {readout}; coco_objects of {args.root}")
    for seed in (int(s) for s in args.seeds.split(",")):
        probe_seed(args, cache, names, seed)


def probe_seed(args, cache: FeatureCache, names: dict[str, str], seed: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ev = EvalConfig(seed=seed)  # the study evaluates seed s with eval.seed = s
    data = load_task("coco_objects", os.path.join(args.root, args.data), max_per_split=args.max_per_split, seed=ev.seed)
    found: dict[str, dict[str, CacheKey]] = {}
    for split in ("train", "test"):
        inputs = digest([str(ex.input) for ex in getattr(data, split)])
        for meta_path in glob.glob(f"{args.root}/feature_cache/coco_objects/{split}/*/meta.json"):
            key = CacheKey(**json.load(open(meta_path))["key"])
            if key.inputs == inputs and names.get(key.model, "").endswith(f"-s{seed}"):
                weights = "" if key.weights == "teacher" or names[key.model].startswith("random") else " student"
                found.setdefault(names[key.model] + weights, {})[split] = key

    def split_of(key: CacheKey, split: str) -> tuple[np.ndarray, np.ndarray]:
        feats = cache.get(key, need_tokens=True)
        if feats is None:  # e.g. an eval that ran no token-reading probe cached pooled features only
            raise LookupError(f"feature cache entry {key.id} has no tokens or is damaged")
        rows = [getattr(data, split)[i] for i in feats.kept]
        boxes = [np.asarray(ex.boxes, np.float32).reshape(-1, 4) for ex in rows]
        labels = np.concatenate([np.asarray(ex.box_labels, np.int64).reshape(-1) for ex in rows])
        return roi_features(feats.tokens, boxes), labels

    for name, folders in sorted(found.items()):
        if set(folders) != {"train", "test"}:
            continue
        t0 = time.perf_counter()
        try:
            (x_tr, y_tr), (x_te, y_te) = split_of(folders["train"], "train"), split_of(folders["test"], "test")
        except LookupError as exc:
            print(f"{name:24s} skipped: {exc}", flush=True)
            continue
        if args.probe_steps:  # the eval job's classifier: standardise, full-batch AdamW (probes/linear.py)
            got = fit_linear(x_tr, y_tr, x_te, y_te, data.info.num_classes, ev, epochs=args.probe_steps)
            train_top1, test_top1 = got["train_top1"], got["top1"]
        else:
            scaler = StandardScaler().fit(x_tr)
            clf = LogisticRegression(C=args.C, max_iter=2000).fit(scaler.transform(x_tr), y_tr)
            train_top1 = float((clf.predict(scaler.transform(x_tr)) == y_tr).mean())
            test_top1 = float((clf.predict(scaler.transform(x_te)) == y_te).mean())
        print(
            f"{name:24s} boxes {len(y_tr)}/{len(y_te)} dim {x_tr.shape[1]} "
            f"train top-1 {train_top1:.3f} test top-1 {test_top1:.3f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
