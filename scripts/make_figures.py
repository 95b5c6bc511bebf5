"""Draw the documentation's figures into docs/images/ (and the study table into docs/study.md).

    .venv/bin/python scripts/make_figures.py                  # all three; the curves need a 300-step run (minutes)
    .venv/bin/python scripts/make_figures.py --only crops,study
    .venv/bin/python scripts/make_figures.py --only budget    # the curves study's plot + docs/study.md block
    .venv/bin/python scripts/make_figures.py --only curves --tracking-uri sqlite:///abpipe_runs/mlflow.db --run demo

- crops.png: one of scikit-image's shipped photos with AB's M crop boxes drawn on it, the M crops,
  the SimCLR annotation views, and the action tokens of one source crop (`make_views`, the crop
  stage's own function, on the demo's view settings scaled to 128 px so the picture reads).
- curves.png: the training curves of a short run (by default a fresh 300-step run of
  jobs/configs/tiny.yaml, the demo's config, under a temporary root; `--config` another recipe; or any
  logged run named with --tracking-uri/--run), with log(global batch), chance for the batch softmaxes,
  drawn on the loss and teacher-entropy panels.
- budget.png: the curves study (`abpipe study --preset dense`, benchmarks/curves_study.sh) read from its jsonl
  (default: the newest dated benchmarks/results/curves_study_<date>.jsonl, not the sparse check pairs'):
  each cheap readout against seen views and against counted training FLOPs, one line per run over its
  checkpoints; its tables, costs and the gap's trend replace the block between
  `<!-- curves-study:start -->` and `<!-- curves-study:end -->` in docs/study.md.
- study.png: the small-scale study read from its jsonl (default: the newest
  benchmarks/results/repro_study_*.jsonl). Nothing is assumed about arms or metrics beyond the
  columns `arm`, `seed` and numeric metric columns: each arm is a group of bars (mean over seeds,
  one dot per seed), each `<name>_top1` column a bar, the `random_init/<name>_top1` column (when
  present) a dashed floor. The same figures, as a markdown table, replace the block between
  `<!-- study-table:start -->` and `<!-- study-table:end -->` in docs/study.md.

Re-run after results change; the figures are committed so the docs show them without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

plt.switch_backend("Agg")  # files only, never a window

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: the checkout's `pipeline` wins
    sys.path.insert(0, str(REPO))
IMAGES = REPO / "docs" / "images"
STUDY_DOC = REPO / "docs" / "study.md"
TABLE_START, TABLE_END = "<!-- study-table:start -->", "<!-- study-table:end -->"
CURVE_KEYS = ("loss_annotation", "loss_propagation", "teacher_entropy", "rankme_encoder", "lr", "views_per_s")
CHANCE_KEYS = ("loss_annotation", "loss_propagation", "teacher_entropy")  # log(batch) = chance for a batch softmax
FLOOR_PREFIX = "random_init/"
COLOURS = plt.cm.tab10.colors


# ---- crops with boxes ---------------------------------------------------------------------------


def crops_figure(out: Path, photo: str = "chelsea", seed: int = 3) -> Path:
    """The photo with its M boxes, the M crops, the A annotation views, and one crop's action tokens."""
    import dataclasses

    import torch

    from pipeline.config import load_config
    from pipeline.data.sample_data import photo_arrays
    from pipeline.data.views import make_views
    from pipeline.objectives.ab_simclr import pair_actions

    photos = photo_arrays()
    image = photos.get(photo, next(iter(photos.values())))
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml").views
    cfg = dataclasses.replace(cfg, view_size=128)
    views = make_views(image, np.random.default_rng(seed), cfg)
    m, a = len(views["views"]), len(views["ann_views"])
    h, w = image.shape[:2]
    actions = pair_actions(torch.as_tensor(views["boxes"])[None])[0].numpy()  # (M, M, 4): [source, target]

    fig = plt.figure(figsize=(12, 5.2))
    grid = fig.add_gridspec(2, 1 + max(m, a), width_ratios=[2.6] + [1] * max(m, a))
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image)
    for i, (x0, y0, x1, y1) in enumerate(views["boxes"] * np.array([w, h, w, h])):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, color=COLOURS[i]))
        right, bottom = i % 2 == 1, i % 4 >= 2  # each label in its own corner, so none hides another
        ax.text(
            x1 - 4 if right else x0 + 4,
            y1 - 4 if bottom else y0 + 4,
            str(i),
            color="white",
            fontsize=11,
            ha="right" if right else "left",
            va="bottom" if bottom else "top",
            weight="bold",
            bbox={"facecolor": COLOURS[i], "pad": 1.5, "lw": 0},
        )
    ax.set_title(f"the image and its M = {m} crop boxes", fontsize=11)
    ax.axis("off")
    for i in range(m):
        sub = fig.add_subplot(grid[0, 1 + i])
        sub.imshow(views["views"][i])
        t = actions[0, i]
        sub.set_title(
            f"crop {i}\naction 0→{i}: ({t[0]:.2f}, {t[1]:.2f},\n{t[2]:.2f}, {t[3]:.2f})", color=COLOURS[i], fontsize=8.5
        )
        sub.axis("off")
    for j in range(a):
        sub = fig.add_subplot(grid[1, 1 + j])
        sub.imshow(views["ann_views"][j])
        sub.set_title(f"annotation view {j}\n(SimCLR-augmented)", fontsize=8.5)
        sub.axis("off")
    fig.suptitle(
        "AB's views of one image: action 0→t = target t's corners in crop 0's frame (crop 0 is [0, 1]²)", fontsize=11
    )
    fig.tight_layout()
    return _save(fig, out)


# ---- learning curves ----------------------------------------------------------------------------


def short_run(root: Path, steps: int, config: Path) -> tuple[str, str]:
    """Ingest the digits and pretrain `config` for `steps` steps; returns (tracking uri, run id)."""
    import dataclasses

    from pipeline.config import load_config
    from pipeline.data.sample_data import write_digits_folder
    from pipeline.ingest import run_ingest
    from pipeline.runtime import quiet_environment
    from pipeline.train.trainer import run_pretrain

    quiet_environment()
    cfg = load_config(config, [f"paths.root={root}", "train.run_name=figures", "train.log_every_steps=10"]).resolved()
    per_step = cfg.train.batch_size * (cfg.views.num_views + cfg.views.annotation_views)
    digits, shards = Path(cfg.paths.under("data", "digits")), cfg.paths.under("shards", "digits")
    if not digits.is_dir():
        write_digits_folder(digits, size=cfg.views.view_size)
    cfg = dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, source="image_folder", input=str(digits), output=shards),
        data=dataclasses.replace(cfg.data, shards=shards),
        train=dataclasses.replace(cfg.train, total_views=steps * per_step),
    )
    run_ingest(cfg)
    return cfg.tracking.tracking_uri, run_pretrain(cfg)["run_id"]


def metric_histories(
    tracking_uri: str, run: str, keys=CURVE_KEYS
) -> tuple[str, dict[str, list[tuple[int, float]]], dict]:
    """(run name, {metric: [(step, value), ...]}, params) of one run, by id or by name (the newest of that name)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        found = client.get_run(run)
    except MlflowException:  # not a run id: look it up by name
        experiments = [e.experiment_id for e in client.search_experiments()]
        hits = client.search_runs(
            experiments, f"attributes.run_name = '{run}'", order_by=["attributes.start_time DESC"]
        )
        if not hits:
            raise SystemExit(f"make_figures: no MLflow run '{run}' in {tracking_uri}")
        found = hits[0]
    out = {}
    for key in keys:
        hist = sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)
        if hist:
            out[key] = [(m.step, m.value) for m in hist]
    return found.info.run_name, out, found.data.params


def global_batch(params: dict) -> int | None:
    """Images per step over all workers, from the run's logged config (None if it was not logged)."""
    try:
        return int(params["train.batch_size"]) * int(params.get("train.num_workers", 1))
    except (KeyError, ValueError):
        return None


def curves_figure(
    out: Path, name: str, histories: dict[str, list[tuple[int, float]]], batch: int | None = None
) -> Path:
    if not histories:
        raise SystemExit("make_figures: the run has none of the curve metrics " + ", ".join(CURVE_KEYS))
    cols = min(3, len(histories))
    rows = math.ceil(len(histories) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, histories.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker=".", ms=4, color=COLOURS[0])
        if batch and key in CHANCE_KEYS:
            ax.axhline(math.log(batch), ls="--", lw=1, color="grey", label=f"log {batch}: chance")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(histories) :]:
        ax.axis("off")
    fig.suptitle(f"training curves of run '{name}' (MLflow metrics)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


# ---- the study ----------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """The study's jsonl: one row per (arm, seed); a later row for the same pair replaces an earlier one."""
    rows: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "arm" not in row:
            raise SystemExit(f"make_figures: {path}:{number}: a study row needs an 'arm' column")
        rows[(row["arm"], row.get("seed"))] = row
    return list(rows.values())


def study_metrics(rows: list[dict]) -> list[str]:
    """The probe metrics to show: numeric `*_top1` columns, except the random-init floor's and train/'s."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if (
                key.endswith("_top1")
                and "/" not in key
                and isinstance(value, (int, float))
                and not key.endswith("train_top1")
            ):
                seen[key] = None
    return list(seen)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise_study(rows: list[dict], metrics: list[str]) -> dict:
    """Return {"arms": [arm, ...] in file order, "cells": {(arm, metric): (mean, sd, n, values)},
    "floor": {metric: (mean, sd, n)}}.

    The floor of a metric is one value per seed (every arm of a seed starts from the same random
    encoder), averaged over seeds.
    """
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cells = {}
    for arm in arms:
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r["arm"] == arm and isinstance(r.get(metric), (int, float))]
            if values:
                cells[(arm, metric)] = (*_mean_sd(values), len(values), values)
    floor = {}
    for metric in metrics:
        per_seed = {
            r.get("seed"): float(r[FLOOR_PREFIX + metric])
            for r in rows
            if isinstance(r.get(FLOOR_PREFIX + metric), (int, float))
        }
        if per_seed:
            floor[metric] = (*_mean_sd(list(per_seed.values())), len(per_seed))
    return {"arms": arms, "cells": cells, "floor": floor}


def arm_labels(arms: list[str]) -> dict[str, str]:
    """The study's own description of each arm where pipeline.study knows it, else the slug."""
    try:
        from pipeline.study import ARMS

        known = {a.slug: a.description for a in ARMS}
    except (ImportError, AttributeError):  # the study module changed shape: slugs still read
        known = {}
    return {arm: known.get(arm, arm) for arm in arms}


def _pct(mean: float, sd: float | None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def study_table(summary: dict, metrics: list[str], labels: dict[str, str]) -> list[str]:
    """Markdown: one row per arm (and the random-init floor first), top-1 % as mean ± sd over seeds."""
    head = "| arm | " + " | ".join(m.removesuffix("_top1") + " top-1 %" for m in metrics) + " | seeds |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    if summary["floor"]:
        cells = [_pct(*summary["floor"][m][:2]) if m in summary["floor"] else "" for m in metrics]
        n = max(v[2] for v in summary["floor"].values())
        lines.append("| *random-init encoder (the floor)* | " + " | ".join(cells) + f" | {n} |")
    for arm in summary["arms"]:
        got = [summary["cells"].get((arm, m)) for m in metrics]
        n = max((g[2] for g in got if g), default=0)
        lines.append(f"| {labels[arm]} | " + " | ".join(_pct(g[0], g[1]) if g else "" for g in got) + f" | {n} |")
    return lines


def study_figure(out: Path, summary: dict, metrics: list[str], labels: dict[str, str], source: str) -> Path:
    arms = summary["arms"]
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.15 * len(arms) + 3), 4.6))
    x = np.arange(len(arms))
    for k, metric in enumerate(metrics):
        colour = COLOURS[k % len(COLOURS)]
        offset = x + (k - (len(metrics) - 1) / 2) * width
        means = [100 * summary["cells"][(a, metric)][0] if (a, metric) in summary["cells"] else np.nan for a in arms]
        sds = [100 * (summary["cells"][(a, metric)][1] or 0) if (a, metric) in summary["cells"] else 0 for a in arms]
        ax.bar(offset, means, width, yerr=sds, capsize=2, color=colour, alpha=0.8, label=metric.removesuffix("_top1"))
        for xi, arm in zip(offset, arms):
            for v in summary["cells"].get((arm, metric), (0, 0, 0, []))[3]:
                ax.plot(xi, 100 * v, "o", ms=3, color="black", alpha=0.6)
        if metric in summary["floor"]:
            ax.axhline(
                100 * summary["floor"][metric][0],
                ls="--",
                lw=1.2,
                color=colour,
                label=f"{metric.removesuffix('_top1')}: random-init floor",
            )
    ax.set_xticks(x, [_wrap(labels[a]) for a in arms], fontsize=8)
    ax.set_ylabel("top-1 % (mean over seeds; dots: seeds)")
    fig.suptitle(f"small-scale study ({source})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2 * len(metrics), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, out)


def _wrap(text: str, width: int = 16) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def replace_block(text: str, lines: list[str], markers: tuple[str, str] = (TABLE_START, TABLE_END)) -> str:
    """Swap what sits between `markers` (default: the study-table ones) for `lines`; a text without both
    markers is an error."""
    first, last = markers
    start, end = text.find(first), text.find(last)
    if start < 0 or end < start:
        raise SystemExit(f"make_figures: {STUDY_DOC.name} needs the markers {first} ... {last}")
    return text[: start + len(first)] + "\n" + "\n".join(lines) + "\n" + text[end:]


def newest_study_jsonl() -> Path:
    found = sorted((REPO / "benchmarks" / "results").glob("repro_study_*.jsonl"))
    if not found:
        raise SystemExit("make_figures: no benchmarks/results/repro_study_*.jsonl; pass --study-jsonl")
    return found[-1]


# ---- the curves study: readouts against seen views and training compute --------------------------

CURVES_START, CURVES_END = "<!-- curves-study:start -->", "<!-- curves-study:end -->"
BUDGET_METRICS = {
    "coco_objects/box_linear_top1": "box cls (linear on box tokens) %",
    "folder/linear_top1": "objects (linear) %",
    "folder/knn_top1": "objects (kNN) %",
}
FAMILIES = {  # arm prefix -> (label, colour): the longest prefix that matches wins
    "ab_simclr": ("AB_SimCLR", COLOURS[0]),
    "simclr": ("SimCLR", COLOURS[1]),
    "ab_objects_to_scenes": ("AB_SimCLR objects->scenes", COLOURS[2]),
    "simclr_mix": ("SimCLR 50/50 mix", COLOURS[3]),
    "simclr_10x_mix": ("SimCLR 50/50 mix", COLOURS[3]),
    "dino": ("DINO 50/50 mix", COLOURS[4]),
}


def family(arm: str) -> tuple[str, tuple]:
    best = max((p for p in FAMILIES if arm.startswith(p)), key=len, default=None)
    return FAMILIES[best] if best else (arm, COLOURS[7])


def budget_figure(out: Path, rows: list[dict], source: str) -> Path:
    """Each readout of the cheap curve probes against seen views (top) and training FLOPs (bottom), log axes:
    one thin line per run (its checkpoints every 10 %), a marker at each run's end; the random-init floor
    (the full eval's, dashed grey)."""
    fig, axes = plt.subplots(2, len(BUDGET_METRICS), figsize=(5 * len(BUDGET_METRICS), 8), squeeze=False)
    shown: dict[str, tuple] = {}
    for col, (metric, title) in enumerate(BUDGET_METRICS.items()):
        floors = [
            r[metric.replace("/", "/random_init/", 1)] for r in rows if metric.replace("/", "/random_init/", 1) in r
        ]
        for row_i, x_key in enumerate(("views", "flops")):
            ax = axes[row_i][col]
            for row in rows:
                points = [p for p in row.get("curve", []) if metric in p and p.get(x_key)]
                if not points:
                    continue
                label, colour = family(row["arm"])
                xs, ys = [p[x_key] for p in points], [100 * p[metric] for p in points]
                ax.plot(xs, ys, color=colour, lw=0.9, alpha=0.6)
                ax.plot(xs[-1:], ys[-1:], "o", color=colour, ms=6)
                shown[label] = colour
            if floors:
                ax.axhline(100 * statistics.mean(floors), color="grey", ls="--", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("seen views" if x_key == "views" else "training FLOPs (counted, one step x steps)")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=1) for c in shown.values()]
    handles.append(plt.Line2D([], [], color="grey", ls="--"))
    fig.legend(handles, [*shown, "random init"], loc="upper center", ncol=len(handles), frameon=False)
    fig.suptitle(f"Dense scenes: readouts as the budget grows ({source})", y=0.93)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, out)


def curves_block(rows: list[dict], source: str) -> list[str]:
    """docs/study.md's curves block: the curve and decoupled tables, the costs and the gap's trend, from `rows`."""
    from pipeline.study import ARMS, TABLES, summarise
    from pipeline.study_curves import curves_report

    parts = [f"From `{source}`: {len(rows)} runs."]
    for name in ("curve", "decoupled"):
        lines = summarise(rows, ARMS, name, with_extras_only=name == "curve")  # the 1x runs start the curve
        if lines:
            parts.append(f"**{TABLES[name]}**\n\n" + "\n".join(lines))
    parts.append(curves_report(rows))
    return "\n\n".join(parts).split("\n")


def newest_curves_jsonl() -> Path:
    # the dense study's dated files, not the check pairs' curves_study_sparse_*.jsonl
    found = sorted((REPO / "benchmarks" / "results").glob("curves_study_[0-9]*.jsonl"))
    if not found:
        raise SystemExit("make_figures: no dated benchmarks/results/curves_study_<date>.jsonl; pass --curves-jsonl")
    return found[-1]


# ---- main ---------------------------------------------------------------------------------------


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})  # no version string: re-runs diff only on content
    plt.close(fig)
    print("wrote", out.relative_to(REPO) if out.is_relative_to(REPO) else out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default="crops,curves,study,budget", help="comma-separated: crops, curves, study, budget"
    )
    parser.add_argument(
        "--curves-jsonl", type=Path, default=None, help="default: newest benchmarks/results/curves_study_*.jsonl"
    )
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder for the PNGs (default docs/images)")
    parser.add_argument(
        "--study-jsonl", type=Path, default=None, help="default: newest benchmarks/results/repro_study_*.jsonl"
    )
    parser.add_argument(
        "--study-doc", type=Path, default=STUDY_DOC, help="markdown file whose study-table block is rewritten"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="curves from this MLflow store (with --run) instead of a fresh run"
    )
    parser.add_argument("--run", default=None, help="MLflow run id or run name for the curves")
    parser.add_argument(
        "--steps", type=int, default=300, help="length of the fresh run for the curves (default: the demo's 300)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "jobs" / "configs" / "tiny.yaml",
        help="config of the fresh run for the curves (default: the demo's, jobs/configs/tiny.yaml)",
    )
    args = parser.parse_args(argv)
    wanted = set(args.only.split(","))
    unknown = wanted - {"crops", "curves", "study", "budget"}
    if unknown:
        parser.error(f"--only: unknown figure(s) {sorted(unknown)}")

    if "crops" in wanted:
        crops_figure(args.out / "crops.png")
    if "study" in wanted:
        path = args.study_jsonl or newest_study_jsonl()
        rows = read_rows(path)
        metrics = study_metrics(rows)
        summary = summarise_study(rows, metrics)
        labels = arm_labels(summary["arms"])
        study_figure(args.out / "study.png", summary, metrics, labels, path.name)
        table = study_table(summary, metrics, labels)
        table.append(f"\nFrom `{path.relative_to(REPO) if path.is_relative_to(REPO) else path}`: {len(rows)} runs.")
        if args.study_doc.exists():
            args.study_doc.write_text(replace_block(args.study_doc.read_text(), table))
            print("updated the study table in", args.study_doc)
        else:
            print("\n".join(table))
    if "budget" in wanted:
        path = args.curves_jsonl or newest_curves_jsonl()
        rows = read_rows(path)
        source = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        budget_figure(args.out / "budget.png", rows, path.name)
        block = curves_block(rows, source)
        if args.study_doc.exists():
            args.study_doc.write_text(replace_block(args.study_doc.read_text(), block, (CURVES_START, CURVES_END)))
            print("updated the curves block in", args.study_doc)
        else:
            print("\n".join(block))
    if "curves" in wanted:
        if args.tracking_uri and args.run:
            uri, run = args.tracking_uri, args.run
        else:
            root = Path(tempfile.mkdtemp(prefix="abpfig-", dir="/tmp"))  # short: Ray's socket paths
            uri, run = short_run(root, args.steps, args.config)
        name, histories, params = metric_histories(uri, run)
        curves_figure(args.out / "curves.png", name, histories, global_batch(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
