"""In-process recipe search for AB at CPU scale (no Ray): the production objectives, views and schedules,
fed from a scenes folder (COCO layout, pipeline/data/scenes.py), with quick frozen-feature probes.

This is the research harness behind the study's recipe (docs/study.md): it swaps Ray Data and Ray Train
for a plain Python loop so dozens of short arms fit on 2 cores. The study itself goes through the real
pipeline (ingest -> Ray Train -> eval job). Probes here are cheap proxies of the eval job's:
- box: logistic regression on the mean of the ViT patch tokens inside each ground-truth box (scenes val)
- obj: logistic regression on mean-pooled patch tokens of the object-centric images, and kNN (k=20)

    python benchmarks/recipe_search.py --root /work/data/fm_scenes --steps 300 --out results.jsonl \
        --set objective.ema_start=0.05 --name fast_teacher
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.crop_stage import MultiViewCropper
from pipeline.models.ab_model import images_to_float
from pipeline.objectives.base import Progress
from pipeline.objectives.registry import build_objective
from pipeline.schedules import ema_rate, warmup_cosine
from pipeline.train.step import Budget, param_groups

REPO = Path(__file__).resolve().parents[1]


def coco_samples(root: str, folder: str, limit: int = 0) -> list[dict]:
    """Samples as the shard writer stores them: key, jpg bytes, json meta (pixel boxes, label names, captions)."""
    inst = json.loads(Path(root, "scenes", "annotations", f"instances_{folder}.json").read_text())
    caps = json.loads(Path(root, "scenes", "annotations", f"captions_{folder}.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    by_image: dict[int, dict] = {
        im["id"]: {"width": im["width"], "height": im["height"], "boxes": [], "labels": [], "captions": []}
        for im in inst["images"]
    }
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]]["boxes"].append([x, y, x + w, y + h])
        by_image[a["image_id"]]["labels"].append(names[a["category_id"]])
    for c in caps["annotations"]:
        by_image[c["image_id"]]["captions"].append(c["caption"])
    out = []
    for im in inst["images"][: limit or None]:
        data = Path(root, "scenes", folder, im["file_name"]).read_bytes()
        out.append(
            {"key": str(im["id"]), "jpg": data, "json": json.dumps(by_image[im["id"]]), "meta": by_image[im["id"]]}
        )
    return out


def batch_stream(samples: list[dict], cropper: MultiViewCropper, batch_size: int, seed: int):
    """Endless full batches: a seeded shuffle per epoch, views cut by the production crop stage."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(samples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [samples[i] for i in order[start : start + batch_size]]
            out = cropper(
                {
                    "key": np.array([s["key"] for s in chunk], dtype=object),
                    "jpg": [s["jpg"] for s in chunk],
                    "json": [s["json"] for s in chunk],
                }
            )
            yield {k: torch.from_numpy(v) for k, v in out.items() if isinstance(v, np.ndarray) and v.dtype != object}
        epoch += 1


@torch.no_grad()
def tokens_of(encoder, images: np.ndarray, size: int, bs: int = 256) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), bs):
        x = torch.from_numpy(images[i : i + bs])
        x = torch.nn.functional.interpolate(
            images_to_float(x), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        feats.append(encoder.forward_features(x).float())
    return torch.cat(feats)


def _decode(samples: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(__import__("io").BytesIO(s["jpg"])).convert("RGB")) for s in samples])


def box_features(encoder, samples: list[dict], size: int, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean patch token inside each ground-truth box (at least the patch under its centre): box_linear's pooling."""
    from pipeline.eval.probes.box_linear import roi_features

    tokens = tokens_of(encoder, _decode(samples), size)[:, prefix:].numpy()  # roi_features wants patches only here
    boxes = [
        np.asarray(s["meta"]["boxes"], np.float32).reshape(-1, 4)
        / np.array([s["meta"]["width"], s["meta"]["height"]] * 2, np.float32)
        for s in samples
    ]
    labels = [label for s in samples for label in s["meta"]["labels"]]
    return roi_features(tokens, boxes), np.array(labels)


def linear_probe(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(scaler.transform(xtr), ytr)
    return float((clf.predict(scaler.transform(xte)) == yte).mean())


def knn_probe(xtr, ytr, xte, yte, k: int = 20) -> float:
    a = torch.nn.functional.normalize(torch.from_numpy(xtr).float(), dim=-1)
    b = torch.nn.functional.normalize(torch.from_numpy(xte).float(), dim=-1)
    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    sim = b @ a.T
    top, idx = sim.topk(k, dim=-1)
    votes = torch.zeros(len(b), len(classes))
    votes.scatter_add_(1, torch.from_numpy(ytr_idx)[idx], (top / 0.07).exp())
    return float((classes[votes.argmax(-1).numpy()] == yte).mean())


def object_images(root: str, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(glob.glob(os.path.join(root, "objects", split, "*", "*.png")))
    rng = np.random.default_rng(0)
    files = [files[i] for i in sorted(rng.choice(len(files), size=min(limit, len(files)), replace=False))]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), np.array(
        [Path(f).parent.name for f in files]
    )


def probes(encoder, data: dict, size: int) -> dict[str, float]:
    encoder.eval()
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    out = {}
    xtr, ytr = box_features(encoder, data["box_train"], size, prefix)
    xte, yte = box_features(encoder, data["box_val"], size, prefix)
    out["box_linear"] = linear_probe(xtr, ytr, xte, yte)
    (otr, oytr), (ote, oyte) = data["obj_train"], data["obj_val"]
    ttr, tte = tokens_of(encoder, otr, size), tokens_of(encoder, ote, size)
    mtr, mte = ttr[:, prefix:].mean(1).numpy(), tte[:, prefix:].mean(1).numpy()
    out["obj_linear"] = linear_probe(mtr, oytr, mte, oyte)
    out["obj_knn"] = knn_probe(mtr, oytr, mte, oyte)
    if prefix:
        out["obj_linear_cls"] = linear_probe(ttr[:, 0].numpy(), oytr, tte[:, 0].numpy(), oyte)
    return out


def run(args) -> dict:
    cfg = load_config(args.config, args.set)
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(args.threads)
    samples = coco_samples(args.root, "train2017", args.train_limit)
    data = {
        "box_train": coco_samples(args.root, "train2017", 1500)[:1500],
        "box_val": coco_samples(args.root, "val2017", 1500),
        "obj_train": object_images(args.root, "train", 2000),
        "obj_val": object_images(args.root, "val", 2000),
    }
    objective = build_objective(cfg)
    size = cfg.views.view_size
    result: dict = {"name": args.name, "set": args.set, "config": str(args.config), "seed": cfg.train.seed}
    if args.probe_init:
        result["init"] = probes(objective.encoders()["student"], data, size)
        print("init", result["init"], flush=True)
    cropper = MultiViewCropper(cfg.views, seed=cfg.train.seed, stats_name=None)
    budget = Budget.from_config(cfg, 1)
    steps = args.steps or budget.total_steps
    warmup = int(cfg.train.warmup_fraction * steps)
    peak = cfg.train.lr * cfg.train.batch_size / 256
    opt = torch.optim.AdamW(param_groups(objective, cfg.train.weight_decay), lr=peak, betas=(0.9, 0.95))
    stream = batch_stream(samples, cropper, cfg.train.batch_size, cfg.train.seed)
    history = []
    objective.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(stream)
        lr = warmup_cosine(step, steps, warmup, peak, cfg.train.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        tau = ema_rate(step, steps, cfg.objective.ema_start, cfg.objective.ema_end, cfg.objective.ema_horizon)
        progress = Progress(step, steps, tau, diagnose=False)
        out = objective(batch, progress)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
        opt.step()
        objective.after_step(progress)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            row = {
                "step": step + 1,
                "loss": float(out.loss),
                **{k: float(v) for k, v in out.terms.items()},
                **{k: float(v) for k, v in out.metrics.items()},
                "s": time.perf_counter() - t0,
            }
            history.append(row)
            print(json.dumps(row), flush=True)
    result["train_s"] = time.perf_counter() - t0
    result["history"] = history
    for which, enc in objective.encoders().items():
        if which == "teacher" and enc is objective.encoders()["student"]:
            continue
        result[which] = probes(enc, data, size)
        print(which, result[which], flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "scenes_small.yaml"))
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--name", default="arm")
    p.add_argument("--out", default="")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-init", action="store_true")
    run(p.parse_args())


if __name__ == "__main__":
    main()
