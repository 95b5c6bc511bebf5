"""The curves study's readouts (issue 26, docs/study.md "The budget grows"): AB against its baselines as the
seen views grow, with the cost of each run next to its figures, and the trend of the gap.

Rows are `abpipe study --preset dense` rows (pipeline/study.py): one per (arm, seed), each a run of its own
budget and schedule, with `views`, `train_flops` (the counted FLOPs of one step x steps), `pretrain_s`,
`eval_s` and, for a run that kept its checkpoints, `curve` (the cheap probes on every 10 % of the run).

The gap's trend: for a metric, each seed's AB figure minus the same seed's baseline figure at the same budget,
fitted by least squares against log10(views). The slope is in the metric's units per decade of views; its
standard error comes from the residuals of the seeds around the line (none with fewer than 3 pairs or one
budget). Where the fitted line crosses zero is reported as what the fit says, not as a measured result.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from pipeline.study import METRICS, PERCENT

# (AB arm, baseline arm) at each budget, as multiples of the study's views; a pair is compared seed by seed.
BUDGET_PAIRS: dict[str, dict[int, tuple[str, str]]] = {
    "AB_SimCLR - SimCLR (dense scenes)": {
        1: ("ab_simclr", "simclr"),
        3: ("ab_simclr_3x", "simclr_3x"),
        10: ("ab_simclr_10x", "simclr_10x"),
    },
    "AB_SimCLR objects->scenes - SimCLR on the scenes": {
        1: ("ab_objects_to_scenes", "simclr"),
        10: ("ab_objects_to_scenes_10x", "simclr_10x"),  # SimCLR on the scenes alone at 10x is the dense arm
    },
    "AB_SimCLR objects->scenes - SimCLR on the mixture": {
        1: ("ab_objects_to_scenes", "simclr_mix"),
        10: ("ab_objects_to_scenes_10x", "simclr_10x_mix"),
    },
    "AB_SimCLR objects->scenes - DINO on the mixture": {
        1: ("ab_objects_to_scenes", "dino_mix"),
        10: ("ab_objects_to_scenes_10x", "dino_10x_mix"),
    },
}
TREND_METRICS = ("coco_objects/box_linear_top1", "coco_objects/decoder_top1", "folder/linear_top1")
CURVE_METRICS = ("coco_objects/box_linear_top1", "folder/linear_top1", "folder/knn_top1")  # the cheap probes


@dataclass(frozen=True)
class Trend:
    n: int  # (views, gap) pairs the line is fitted to
    budgets: int  # distinct view counts among them
    intercept: float  # gap at 1 view (log10 views = 0)
    slope: float  # gap per decade of views
    slope_se: float | None  # None: fewer than 3 pairs, or a single budget
    crossing_views: float | None  # views where the fitted gap is 0 (None: a flat line)

    def gap_at(self, views: float) -> float:
        return self.intercept + self.slope * math.log10(views)


def fit_trend(points: Sequence[tuple[float, float]]) -> Trend:
    """Least-squares line of gap against log10(views) through `points` [(views, gap)], with the slope's
    standard error from the residuals (n - 2 degrees of freedom)."""
    if not points:
        raise ValueError("fit_trend: no (views, gap) points")
    if any(v <= 0 for v, _ in points):
        raise ValueError(f"fit_trend: views must be > 0, got {[v for v, _ in points]}")
    xs = [math.log10(v) for v, _ in points]
    ys = [g for _, g in points]
    n, budgets = len(points), len(set(xs))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if budgets < 2:
        return Trend(n, budgets, my, 0.0, None, None)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    se = None
    if n > 2:
        rss = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
        se = math.sqrt(rss / (n - 2) / sxx)
    crossing = 10 ** (-intercept / slope) if slope != 0 and abs(intercept / slope) < 300 else None
    return Trend(n, budgets, intercept, slope, se, crossing)


def row_views(row: dict) -> float | None:
    if row.get("views"):
        return float(row["views"])
    if row.get("steps") and row.get("views_per_step"):
        return float(row["steps"] * row["views_per_step"])
    return None


def gap_points(rows: Sequence[dict], pairs: dict[int, tuple[str, str]], metric: str) -> list[tuple[float, float]]:
    """[(views, AB - baseline)] for every seed and budget where both arms have `metric` (percent points for
    top-1 metrics, as the tables show them)."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    scale = 100.0 if metric.endswith(PERCENT) else 1.0
    points = []
    for ab, base in pairs.values():
        for (arm, seed), row in sorted(by.items()):
            other = by.get((base, seed))
            if arm != ab or other is None or metric not in row or metric not in other:
                continue
            views = row_views(row)
            if views:
                points.append((views, (row[metric] - other[metric]) * scale))
    return points


def curve_gap_points(rows: Sequence[dict], pairs: dict[int, tuple[str, str]], metric: str) -> list[tuple[float, float]]:
    """[(views, AB - baseline)] from the curves inside the runs: each checkpoint of an AB run against the
    same seed's baseline checkpoint at the same seen views (both runs checkpoint every 10 % of equal views).
    Mid-run points are not runs of that budget: their learning rate has not decayed yet."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    scale = 100.0 if metric.endswith(PERCENT) else 1.0
    points = []
    for ab, base in pairs.values():
        for (arm, seed), row in sorted(by.items()):
            other = by.get((base, seed))
            if arm != ab or other is None:
                continue
            theirs = {p["views"]: p[metric] for p in other.get("curve", []) if metric in p}
            points += [
                (p["views"], (p[metric] - theirs[p["views"]]) * scale)
                for p in row.get("curve", [])
                if metric in p and p["views"] in theirs
            ]
    return points


def _num(value: float, digits: int = 1) -> str:
    return f"{value:+.{digits}f}"


def trend_sentence(label: str, metric: str, points: list[tuple[float, float]]) -> str | None:
    """One line a reader can check against the rows: the gap at each budget (mean ± sd over seeds), the fitted
    slope per decade ± its standard error, and where the line would cross zero."""
    if not points:
        return None
    unit = "points" if metric.endswith(PERCENT) else ""
    digits = 1 if metric.endswith(PERCENT) else 3
    at = []
    for views in sorted({v for v, _ in points}):
        gaps = [g for v, g in points if v == views]
        sd = f" ± {statistics.stdev(gaps):.{digits}f}" if len(gaps) > 1 else ""
        at.append(f"{_num(statistics.fmean(gaps), digits)}{sd} at {views:,.0f} views (n={len(gaps)})")
    trend = fit_trend(points)
    text = f"{label}, {METRICS.get(metric, metric)}: " + "; ".join(at)
    if trend.budgets < 2:
        return text + " (one budget: no trend yet)."
    se = f" ± {trend.slope_se:.{digits}f}" if trend.slope_se is not None else " (no uncertainty: 2 pairs)"
    text += f"; fitted slope {_num(trend.slope, digits)}{se} {unit} per decade of views".replace("  ", " ")
    closing = trend.crossing_views is not None and (trend.gap_at(max(v for v, _ in points)) * trend.slope < 0)
    if closing:
        text += f", a line that would reach 0 at about {trend.crossing_views:.2g} views (extrapolated)."
    elif trend.gap_at(max(v for v, _ in points)) > 0:  # the first arm ahead, and not losing its lead
        text += ", a line that keeps the gap positive and widening at larger budgets."
    else:
        text += ", a line that does not close the gap at larger budgets."
    return text


def cost_table(rows: Sequence[dict], arms: Sequence[str], labels: dict[str, str]) -> list[str]:
    """Per arm (mean over its seeds): views, steps, training FLOPs, pretraining and evaluation wall time."""
    lines = [
        "| arm | seeds | views | steps | train TFLOPs | pretrain s | eval s (last ckpt) | curve eval s / ckpt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue

        def mean(key: str, digits: int = 0, scale: float = 1.0, rows_=mine) -> str:
            values = [r[key] * scale for r in rows_ if r.get(key) is not None]
            return f"{statistics.fmean(values):,.{digits}f}" if values else "—"

        per_ckpt = [r["curve_eval_s"] / r["curve_checkpoints"] for r in mine if r.get("curve_checkpoints")]
        cells = [
            labels.get(arm, arm),
            str(len(mine)),
            mean("views"),
            mean("steps"),
            mean("train_flops", 1, 1e-12),
            mean("pretrain_s"),
            mean("eval_s"),
            f"{statistics.fmean(per_ckpt):.1f}" if per_ckpt else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sentences(rows: Sequence[dict], metrics: Sequence[str], points) -> list[str]:
    """A trend_sentence line per (pair set of BUDGET_PAIRS, metric) with points; `points` is gap_points or
    curve_gap_points."""
    lines = (trend_sentence(label, m, points(rows, pairs, m)) for label, pairs in BUDGET_PAIRS.items() for m in metrics)
    return [f"- {line}" for line in lines if line]


def curves_report(rows: Sequence[dict]) -> str:
    """Markdown of the curves study: costs per arm, then the gap's trend sentences."""
    from pipeline.study import ARMS

    labels = {a.slug: a.description for a in ARMS}
    present = [a.slug for a in ARMS if any(r["arm"] == a.slug for r in rows)]
    parts = ["**Cost of each run** (mean over seeds)\n\n" + "\n".join(cost_table(rows, present, labels))]
    sentences = _sentences(rows, TREND_METRICS, gap_points)
    if sentences:
        parts.append("**The gap, AB minus baseline, seed by seed at equal views**\n\n" + "\n".join(sentences))
    inside = _sentences(rows, CURVE_METRICS, curve_gap_points)
    if inside:
        parts.append(
            "**The gap inside the runs** (each checkpoint against the baseline's at the same views; the cheap "
            "probes on 1,000 images per split; mid-run checkpoints have not finished their schedule)\n\n"
            + "\n".join(inside)
        )
    return "\n\n".join(parts)
