"""The scenes study: AB against its baselines and ablations on a COCO-style scene set of real objects.

The AB paper's claim is strongest on scene data (Table 2: COCO pretraining, AB_SimCLR vs SimCLR on
box-conditioned object classification and detection; Table 3: AB_CLIP vs CLIP with boxes + class names
as the annotations; Table 4: ablations). This module reruns those comparisons at CPU scale through the
real pipeline, on the scene set of `pipeline.data.scenes` (`scenes.*` config):

  scenes (COCO layout) --abpipe ingest coco--> shards --abpipe train--> checkpoint --abpipe eval--> probes
  objects (folder layout, one object per image) --abpipe ingest image_folder--> shards (object-centric arms)

Every arm is pretrained for the same number of seen views (each crop and annotation view counts once)
unless its overrides say otherwise (the "equal steps" check), then probed the same way: the paper's
decoder probe on box classification (`coco_objects`) and detection (`coco_detection`) of the scenes, and
linear / kNN / decoder probes on the object-centric variant (`folder`). Each probe also runs on the
randomly initialised encoder the run started from: the floor every row must beat (once per seed and
pretraining data: every arm of a seed starts from that same encoder; later rows copy the figures and
name the row they came from, `random_init_from`).

Runs are named `study-<arm>-s<seed>` under one root, so re-running the study skips finished rows
(`<root>/study_results.jsonl`), resumes an interrupted pretraining run from its last checkpoint, and
re-evaluates it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.config import Config, load_config, packaged_config

DEFAULT_CONFIG = packaged_config("scenes_small.yaml")  # package data: the study runs from any install

# The metrics a study row keeps (eval job keys, `<task>/<probe>_<metric>`), with their table headers.
METRICS = {
    "coco_objects/decoder_top1": "box cls (decoder top-1 %)",
    "coco_objects/box_linear_top1": "box cls (linear on the box's tokens, top-1 %)",
    "coco_detection/decoder_map50": "detection (decoder mAP@50)",
    "coco_detection/decoder_map": "detection (decoder mAP)",
    "folder/linear_top1": "objects (linear top-1 %)",
    "folder/knn_top1": "objects (kNN top-1 %)",
    "folder/decoder_top1": "objects (decoder top-1 %)",
}
PERCENT = ("top1",)  # metrics shown in percent; mAP is shown as is
WATCHED = (
    "loss",
    "loss_annotation",
    "loss_propagation",
    "loss_contrastive",
    "teacher_entropy",
    "rankme_encoder",
    "rankme_head",
    "views_per_s",
)
# The partly annotated arms: the share of the train scenes whose boxes (as text) they see.
ANNOTATED_FRACTION = 0.1
_SHARE = f"{ANNOTATED_FRACTION * 100:g} %"  # "10 %", in the partly annotated arms' labels
TABLES = {
    "scenes": "Pretraining on the scenes (the paper's Table 2 and Table 4)",
    "clip": "Boxes + class names as text annotations (the paper's Table 3)",
    "objects": "Pretraining on the object-centric variant (the ImageNet analogue)",
    "partial": f"Boxes as text on {_SHARE} of the scenes (AB's own setting: AB_CLIP also crops the other "
    f"{100 - ANNOTATED_FRACTION * 100:g} %)",
}


@dataclass(frozen=True)
class Arm:
    slug: str
    description: str
    overrides: tuple[str, ...] = ()
    seeds: int = 1
    data: str = "scenes"  # scenes | objects | scenes_annotated: the shard set it pretrains on
    annotations: str = ""  # a shard set of its own for the annotation stream (data.annotation_shards); "" = data's
    table: str = "scenes"  # which table of TABLES it is reported in
    paper: dict[str, float] = field(default_factory=dict)  # the paper's figure for a metric of ours, where one exists

    @property
    def floor_data(self) -> str:
        return floor_data(self.data)


def floor_data(data: str) -> str:
    """The pretraining data whose random-init row an arm on `data` shares: the partly annotated scenes
    are probed on the same tasks as the scenes, so they share its floor (the encoder depends on the seed)."""
    return "objects" if data == "objects" else "scenes"


# The SimCLR baseline reads only the two annotation views: the AB crops would be cut, counted, never used.
SIMCLR = ("objective.name=simclr", "views.num_views=0")
# Table 3's annotations: each scene's boxes as class names ("sneaker, bag"), scored by a small CLIP text tower.
BOX_TEXT = (
    "views.text.source=boxes",
    "views.text.box_format=names",
    "views.annotation_views=1",
    "views.annotation_scale=[0.5,1.0]",
    "views.color_jitter=0.0",
    "views.grayscale_p=0.0",
    "views.blur_p=0.0",
)
CLIP = ("objective.name=clip", "views.num_views=0", *BOX_TEXT)
AB_CLIP = ("objective.name=ab_clip", *BOX_TEXT)

ARMS: tuple[Arm, ...] = (
    Arm(
        "ab_simclr",
        "AB_SimCLR",
        (),
        seeds=3,
        paper={"coco_objects/decoder_top1": 72.6, "coco_detection/decoder_map": 0.27},
    ),
    Arm(
        "simclr",
        "SimCLR (equal views)",
        SIMCLR,
        seeds=3,
        paper={"coco_objects/decoder_top1": 70.4, "coco_detection/decoder_map": 0.24},
    ),
    # Equal views give SimCLR (2 views per image) 3x AB's steps (6 views per image); this check holds steps equal.
    Arm("simclr_equal_steps", "SimCLR (equal steps: 1/3 of the views)", (*SIMCLR, "train.total_views=@/3")),
    Arm("null_actions", "AB_SimCLR, no action tokens (Table 4)", ("objective.null_actions=true",)),
    Arm("no_target", "AB_SimCLR, no target network (Table 4)", ("objective.teacher=student",)),
    Arm("no_grounding", "AB_SimCLR, no grounding loss (Table 4)", ("objective.annotation_weight=0",)),
    Arm("augment", "AB_SimCLR, adding augmentations (Table 4)", ("views.augment_views=true",)),
    Arm("ab_clip", "AB_CLIP, boxes as text", AB_CLIP, seeds=3, table="clip", paper={"coco_objects/decoder_top1": 34.9}),
    Arm(
        "clip",
        "CLIP, boxes as text (equal views)",
        CLIP,
        seeds=3,
        table="clip",
        paper={"coco_objects/decoder_top1": 31.6},
    ),
    Arm("objects_ab_simclr", "AB_SimCLR on objects", (), data="objects", table="objects"),
    Arm("objects_simclr", "SimCLR on objects (equal views)", SIMCLR, data="objects", table="objects"),
    # AB's own setting: annotations on part of the data, the propagation loss carries them to the rest.
    Arm(
        "ab_clip_partial",
        f"AB_CLIP: boxes of {_SHARE} of the scenes as text, crops from all",
        # two streams (crops, annotations) each need an actor and a read task in the CPU training leaves
        (*AB_CLIP, "views.cpus_per_actor=0.25", "data.read_cpus=0.25"),
        annotations="scenes_annotated",
        seeds=3,
        table="partial",
    ),
    Arm(
        "clip_partial",
        f"CLIP on the annotated {_SHARE} (equal views)",
        CLIP,
        data="scenes_annotated",
        seeds=3,
        table="partial",
    ),
    Arm(
        "clip_partial_equal_steps",
        f"CLIP on the annotated {_SHARE} (equal steps: 1/5 of the views)",
        (*CLIP, "train.total_views=@/5"),
        data="scenes_annotated",
        table="partial",
    ),
)


def arm_config(
    arm: Arm, seed: int, base: Config, config: str, overrides: Sequence[str], shards: dict[str, str]
) -> Config:
    """The arm's resolved config: the study's config + its overrides + the arm's, at this seed."""
    # "train.total_views=@/N": the study's views / N, equal steps with AB for a method that cuts N times
    # fewer views per image (SimCLR 2 vs AB_SimCLR's 6: N = 3; CLIP 1 vs AB_CLIP's 5: N = 5)
    own = [
        f"train.total_views={base.train.total_views // int(o.split('@/')[1])}"
        if o.startswith("train.total_views=@/")
        else o
        for o in arm.overrides
    ]
    named = [f"train.seed={seed}", f"train.run_name=study-{arm.slug}-s{seed}", f"data.shards={shards[arm.data]}"]
    if arm.annotations:
        named.append(f"data.annotation_shards={shards[arm.annotations]}")
    return load_config(config, [*overrides, *own, *named]).resolved()


def prepare_data(cfg: Config, needed: set[str]) -> dict[str, str]:
    """Write the scene set (once) and ingest what the arms need; returns {scenes|objects|scenes_annotated:
    shard dir}."""
    from pipeline.data.scenes import annotated_subset, write_scenes
    from pipeline.ingest import run_ingest

    write_scenes(cfg.scenes)
    data = Path(cfg.scenes.output)
    shards = {
        "scenes": cfg.paths.under("shards", f"scenes_{cfg.scenes.objects}"),
        "objects": cfg.paths.under("shards", f"objects_{cfg.scenes.objects}"),
        "scenes_annotated": cfg.paths.under(
            "shards", f"scenes_{cfg.scenes.objects}_annotated{ANNOTATED_FRACTION * 100:g}"
        ),
    }

    def ingest_scenes(output: str, jsons: dict[str, str]) -> None:
        coco = dataclasses.replace(cfg.ingest.coco, **jsons)
        images = str(data / "scenes" / "train2017")
        ingest = dataclasses.replace(cfg.ingest, source="coco", input=images, output=output, coco=coco)
        run_ingest(dataclasses.replace(cfg, ingest=ingest))

    if "scenes" in needed:
        ann = data / "scenes" / "annotations"
        ingest_scenes(
            shards["scenes"],
            {"instances": str(ann / "instances_train2017.json"), "captions": str(ann / "captions_train2017.json")},
        )
    if "scenes_annotated" in needed:
        ingest_scenes(shards["scenes_annotated"], annotated_subset(data, ANNOTATED_FRACTION))
    if "objects" in needed:
        ingest = dataclasses.replace(
            cfg.ingest, source="image_folder", input=str(data / "objects" / "train"), output=shards["objects"]
        )
        run_ingest(dataclasses.replace(cfg, ingest=ingest))
    return shards


def eval_config(cfg: Config, checkpoint: str, seed: int) -> Config:
    data = Path(cfg.scenes.output)
    roots = {
        "coco_objects": str(data / "scenes"),
        "coco_detection": str(data / "scenes"),
        "folder": str(data / "objects"),
    }
    ev = dataclasses.replace(cfg.eval, checkpoint=checkpoint, tasks=list(roots), task_roots=roots, seed=seed)
    return dataclasses.replace(cfg, eval=ev)


def random_init_row(done: dict[tuple[str, int], dict], seed: int, data: str, probes: Sequence[str] = ()) -> dict | None:
    """An earlier row of this seed and pretraining data that holds the random-init floor: every arm of a
    seed starts from the same random encoder (same architecture, view size, seed), so its probes are
    trained once per (seed, data), not once per arm. A row whose floor lacks one of `probes` (it was
    probed before the study's `eval.probes` grew) is not taken: the arm probes the floor again."""
    for row in done.values():
        if row["seed"] != seed or floor_data(row.get("data", "")) != data:
            continue
        floor = [k.split("/random_init/")[1] for k in row if "/random_init/" in k]
        if floor and all(any(f.startswith(f"{p}_") for f in floor) for p in probes):
            return row
    return None


def run_arm(
    arm: Arm,
    seed: int,
    base: Config,
    config: str,
    overrides: Sequence[str],
    shards: dict[str, str],
    floor: dict | None = None,
) -> dict:
    """Pretrain and probe one (arm, seed); with `floor` (random_init_row), its random-init figures are
    taken over instead of probing the random encoder again."""
    from pipeline.eval.job import run_eval
    from pipeline.train.trainer import run_pretrain

    cfg = arm_config(arm, seed, base, config, overrides, shards)
    t0 = time.perf_counter()
    train = run_pretrain(cfg)
    train_s = time.perf_counter() - t0
    ev = eval_config(cfg, train["checkpoint"], seed)
    if floor is not None:
        ev = dataclasses.replace(ev, eval=dataclasses.replace(ev.eval, random_init=False))
    metrics = run_eval(ev)["metrics"]
    if floor is not None:
        metrics = {**{k: v for k, v in floor.items() if "/random_init/" in k}, **metrics}
        metrics["random_init_from"] = floor["run_id"]
    watch = {f"train/{k}": v for k, v in train["metrics"].items() if k in WATCHED}
    timing = {"pretrain_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0 - train_s, 1)}
    return {
        "arm": arm.slug,
        "seed": seed,
        "run_id": train["run_id"],
        "steps": train["metrics"].get("step"),
        **metrics,
        **watch,
        **timing,
    }


def _value(metric: str, v: float) -> float:
    return v * 100 if metric.endswith(PERCENT) else v


def _fmt(values: list[float], metric: str) -> str:
    if not values:
        return "—"
    digits = 1 if metric.endswith(PERCENT) else 3
    mean = statistics.mean(values)
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{sd}"


def summarise(
    results: list[dict], arms: Sequence[Arm], table: str, metrics: Sequence[str] = tuple(METRICS)
) -> list[str]:
    """Markdown table of one study table: mean ± sd over seeds per metric, the random-init floor first,
    the paper's figure in brackets where it reported one for that metric."""
    rows = [a for a in arms if a.table == table]
    shown = [m for m in metrics if any(m in r for r in results if r["arm"] in {a.slug for a in rows})]
    if not shown:
        return []
    lines = [
        "| arm | seeds | " + " | ".join(METRICS.get(m, m) for m in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    slugs = {a.slug for a in rows}
    floor_cells = []
    for m in shown:
        # one figure per seed: every arm of a seed in a table starts from the same random encoder
        per_seed = {
            r["seed"]: _value(m, r[f"{m.split('/')[0]}/random_init/{m.split('/', 1)[1]}"])
            for r in results
            if r["arm"] in slugs and f"{m.split('/')[0]}/random_init/{m.split('/', 1)[1]}" in r
        }
        floor_cells.append(_fmt(list(per_seed.values()), m))
    n_floor = len({r["seed"] for r in results if r["arm"] in slugs})
    lines.append(f"| Random-init encoder (same probes) | {n_floor} | " + " | ".join(floor_cells) + " |")
    for arm in rows:
        mine = [r for r in results if r["arm"] == arm.slug]
        cells = []
        for m in shown:
            cell = _fmt([_value(m, r[m]) for r in mine if m in r], m)
            if m in arm.paper:
                cell += f" (paper {arm.paper[m]})"
            cells.append(cell)
        lines.append(f"| {arm.description} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def load_results(path: Path) -> dict[tuple[str, int], dict]:
    if not path.exists():
        return {}
    return {(r["arm"], r["seed"]): r for r in map(json.loads, path.read_text().splitlines()) if r}


def report(results_path: str | Path) -> str:
    """Markdown of every study table from a results jsonl (a study's own, or a committed copy)."""
    results = list(load_results(Path(results_path)).values())
    parts = []
    for name, title in TABLES.items():
        lines = summarise(results, ARMS, name)
        if lines:
            parts.append(f"**{title}**\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def hold_study_lock(root: Path):
    """One `abpipe study` per root: two would train the same run names into the same folders and append
    to one results file. Returns the open lock file (the OS drops the lock when the process ends);
    a second study on the root gets a ConfigError naming it."""
    import fcntl

    from pipeline.config import ConfigError

    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / "study.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"another `abpipe study` is running on {root} (it holds {root / 'study.lock'}); "
            "wait for it to finish, or give this one another paths.root"
        ) from None
    return handle


def run_study(
    config: str = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    arms: Sequence[str] | None = None,
    max_seeds: int | None = None,
) -> dict:
    """Run (or resume) the study; returns the rows and the markdown tables."""
    base = load_config(config, overrides).resolved()
    unknown = sorted(set(arms or ()) - {a.slug for a in ARMS})
    if unknown:
        from pipeline.config import ConfigError

        raise ConfigError(f"unknown study arm(s) {unknown}; known: {', '.join(a.slug for a in ARMS)}")
    selected = [a for a in ARMS if arms is None or a.slug in arms]
    results_path = Path(base.paths.under("study_results.jsonl"))
    lock = hold_study_lock(results_path.parent)  # noqa: F841  (held until this process ends)
    shards = prepare_data(base, {a.data for a in selected} | {a.annotations for a in selected if a.annotations})
    done = load_results(results_path)
    # Seed-major: every arm's seed 0 before any seed 1, so a study cut short still covers every arm.
    todo = [
        (arm, seed)
        for seed in range(max(a.seeds for a in selected))
        for arm in selected
        if seed < min(arm.seeds, max_seeds or arm.seeds)
    ]
    for arm, seed in todo:
        if (arm.slug, seed) in done:
            continue
        floor = random_init_row(done, seed, arm.floor_data, base.eval.probes) if base.eval.random_init else None
        row = run_arm(arm, seed, base, config, overrides, shards, floor)
        row = {**row, "data": arm.data, "objects": base.scenes.objects}
        done[(arm.slug, seed)] = row
        with results_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    results = list(done.values())
    tables = {t: summarise(results, selected, t) for t in TABLES}
    return {"results": results, "tables": tables, "results_file": str(results_path)}
