"""Result tables (markdown + CSV) and plots for one evaluation and for a sweep's comparison.

Tables are written by hand (a dozen lines of markdown) so they read well in MLflow's artifact
viewer and in a terminal; plots use matplotlib's non-interactive Agg backend (no display needed on
a Ray worker or a cron host).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

RANDOM_PREFIX = "random_init/"


def result_rows(metrics: dict[str, float]) -> list[tuple[str, float, float | None]]:
    """(metric, pretrained, random init or None) for every pretrained metric, in logged order."""
    return [(k, v, metrics.get(RANDOM_PREFIX + k)) for k, v in metrics.items() if not k.startswith(RANDOM_PREFIX)]


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def write_eval_results(
    out_dir: str, rows: Sequence[tuple[str, float, float | None]], info: dict[str, Any]
) -> list[str]:
    """results.md / results.csv of one (checkpoint, task) evaluation; returns the paths."""
    md = [f"# `{info['task']}` eval of `{info['checkpoint']}` (step {info['step']})", ""]
    md += [
        f"task root `{info['root']}` ({info['kind']}, {info['n_classes']} classes): {info['n_train']} train / "
        f"{info['n_test']} test images",
        "",
    ]
    md += [f"skipped images: {info['skipped'] or 'none'}; features from cache: {info['cached'] or 'none'}", ""]
    md += ["| metric | pretrained | random init | delta |", "|---|---|---|---|"]
    md += [f"| {k} | {v:.4f} | {_fmt(r)} | {'' if r is None else f'{v - r:+.4f}'} |" for k, v, r in rows]
    paths = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.csv")]
    Path(paths[0]).write_text("\n".join(md) + "\n")
    with open(paths[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "metric", "pretrained", "random_init"])
        writer.writerows([(info["task"], k, v, "" if r is None else r) for k, v, r in rows])
    return paths


def plot_eval(path: str, rows: Sequence[tuple[str, float, float | None]], title: str) -> str:
    """Grouped bars: pretrained vs random init per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, _, _ in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [v for _, v, _ in rows], width=0.4, label="pretrained")
    ax.bar([x + 0.2 for x in xs], [r if r is not None else 0.0 for _, _, r in rows], width=0.4, label="random init")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Methods x tasks, like Table 1 of the AB paper.

    `records` are finished evaluations: {row, step, task, metrics}. Each row (a pretraining run)
    takes, per task, its newest evaluated checkpoint; columns are `<task>/<metric>` of the
    pretrained encoder (random-init references and train-set accuracies left out).
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        slot = (rec["row"], rec["task"])
        if slot not in latest or rec["step"] > latest[slot]["step"]:
            latest[slot] = rec
    columns = sorted(
        {
            f"{rec['task']}/{k}"
            for rec in latest.values()
            for k in rec["metrics"]
            if not k.startswith(RANDOM_PREFIX) and "train_" not in k
        }
    )
    rows = []
    for row in sorted({r for r, _ in latest}):
        steps = sorted({str(latest[(row, t)]["step"]) for r, t in latest if r == row})
        values = []
        for col in columns:
            task, metric = col.split("/", 1)
            rec = latest.get((row, task))
            values.append(rec["metrics"].get(metric) if rec else None)
        rows.append([row, "/".join(steps), *values])
    return ["run", "step", *columns], rows


def write_comparison(out_dir: str, header: list[str], rows: list[list[Any]], title: str) -> list[str]:
    """comparison.md / comparison.csv; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    md = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(v) if not isinstance(v, float) else _fmt(v) for v in row) + " |" for row in rows]
    paths = [os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.csv")]
    Path(paths[0]).write_text("\n".join(md) + "\n")
    with open(paths[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return paths


def write_records(path: str, records: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    """One CSV line per record (long format: every checkpoint, every metric, or every failure)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path


def plot_sweep(path: str, records: Sequence[dict[str, Any]]) -> str | None:
    """Metric vs checkpoint step, one panel per `<task>/<metric>`, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rec in records:
        for k, v in rec["metrics"].items():
            if k.startswith(RANDOM_PREFIX) or "train_" in k:
                continue
            series.setdefault(f"{rec['task']}/{k}", {}).setdefault(rec["row"], []).append((rec["step"], v))
    if not series:
        return None
    panels = sorted(series)
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for row, points in sorted(series[name].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=row)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
