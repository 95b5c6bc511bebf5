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

from pipeline.config import Config, ConfigError, load_config, packaged_config

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
    # the text-tower arms' own readouts (issue 27): their text tower against the class names and the captions
    "coco_objects/zero_shot_top1": "box cls (zero-shot top-1 %)",
    "folder/zero_shot_top1": "objects (zero-shot top-1 %)",
    "coco_captions/retrieval_i2t_r5": "retrieval image->text (R@5 %)",
    "coco_captions/retrieval_t2i_r5": "retrieval text->image (R@5 %)",
}
PERCENT = ("top1", "_r1", "_r5", "_r10")  # metrics shown in percent; mAP is shown as is
# What the eval of a method with a text tower adds (pipeline.objectives.towers, docs/evaluation.md)
TEXT_READOUTS = ("zero_shot", "retrieval")
WATCHED = (
    "loss",
    "loss_annotation",
    "loss_propagation",
    "loss_contrastive",
    "teacher_entropy",
    "rankme_encoder",
    "rankme_head",
    "views_per_s",
    "flops_per_step",
    "train_s",  # the training loop's seconds over every session of the run (pretrain_s: this call's wall clock)
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
    "curve": "The budget grows: 1x, 3x and 10x the study's views (each budget its own run and schedule)",
    "decoupled": "AB's decoupled setting (the paper's Fig. 3 top): annotations from the objects, crops from the scenes",
    "captions": "Captions as text annotations: zero-shot and retrieval readouts of the text tower",
}
# Arms a table shows beside its own: the 1x runs are the curve's first budget, SimCLR on the scenes alone is
# one of the decoupled setting's baselines.
TABLE_EXTRA = {"curve": ("ab_simclr", "simclr"), "decoupled": ("simclr",)}

# Scene presets, fixed before any of their results (issue 26). "dense": COCO's density (about 7 objects per
# image, most of them small: Lin et al. 2014), where two random crops of a scene often hold different objects:
# a 96 px canvas with 3-9 objects of 14-32 px, views still 48 px. Every run of the preset also checkpoints
# every 10 % of its steps, and the study probes those checkpoints cheaply (CURVE_PROBES): the curve inside a run.
PRESETS: dict[str, tuple[str, ...]] = {
    "dense": (
        "scenes.canvas=96",
        "scenes.min_objects=3",
        "scenes.max_objects=9",
        "scenes.min_size=14",
        "scenes.max_size=32",
        "train.checkpoint_fraction=0.1",
    ),
}
# The probes run on every intermediate checkpoint of a run that keeps them (train.checkpoint_fraction > 0):
# the cheap ones that separate encoders; the decoder probe and detection run on the last checkpoint only.
CURVE_PROBES = ("knn", "linear", "box_linear")
CURVE_TASKS = ("coco_objects", "folder")
CURVE_MAX_PER_SPLIT = (
    1000  # images per split for those probes (the last checkpoint's full eval keeps eval.max_per_split)
)


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
# The scenes' generated captions as the text (the COCO layout's captions_*.json), CLIP's crop otherwise as above.
CAPTION_TEXT = ("views.text.source=captions", *BOX_TEXT[2:])
# DINO's two global views (the annotation views, no locals) and its head at the study's scale: 4,096 prototypes
# behind a 512-wide MLP (SimCLR's projector width), not the ViT-S recipe's 65,536 behind 2,048.
DINO = (
    "objective.name=dino",
    "views.num_views=0",
    "objective.dino.out_dim=4096",
    "objective.dino.hidden_dim=512",
    "objective.dino.bottleneck_dim=128",
)
CURVE = ("train.checkpoint_fraction=0.1",)  # ten checkpoints per run, probed by the study's curve sweep
X3, X10 = "train.total_views=@*3", "train.total_views=@*10"
# two streams (crops, annotations) each need an actor and a read task in the CPU training leaves
TWO_STREAMS = ("views.cpus_per_actor=0.25", "data.read_cpus=0.25")

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
    # The text tower read back (issue 27): captions instead of box names, so retrieval has sentences to find.
    Arm(
        "ab_clip_captions",
        "AB_CLIP, captions as text",
        ("objective.name=ab_clip", *CAPTION_TEXT),
        seeds=2,
        table="captions",
    ),
    Arm(
        "clip_captions",
        "CLIP, captions as text (equal views)",
        ("objective.name=clip", "views.num_views=0", *CAPTION_TEXT),
        seeds=2,
        table="captions",
    ),
    # The budget grows (issue 26): each budget is its own run with its own cosine schedule.
    Arm("ab_simclr_3x", "AB_SimCLR, 3x the views", (*CURVE, X3), seeds=2, table="curve"),
    Arm("simclr_3x", "SimCLR, 3x the views", (*SIMCLR, *CURVE, X3), seeds=2, table="curve"),
    Arm("ab_simclr_10x", "AB_SimCLR, 10x the views", (*CURVE, X10), seeds=2, table="curve"),
    Arm("simclr_10x", "SimCLR, 10x the views", (*SIMCLR, *CURVE, X10), seeds=2, table="curve"),
    # AB in its own setting: the annotation loss on object-centric images, propagation crops from the scenes.
    Arm(
        "ab_objects_to_scenes",
        "AB_SimCLR, objects -> scenes (annotations: objects; crops: scenes)",
        (*CURVE, *TWO_STREAMS),
        data="scenes",
        annotations="objects",
        seeds=2,
        table="decoupled",
    ),
    Arm("simclr_mix", "SimCLR on 50/50 objects + scenes", (*SIMCLR, *CURVE), data="mix", seeds=2, table="decoupled"),
    Arm("dino_mix", "DINO on 50/50 objects + scenes", (*DINO, *CURVE), data="mix", seeds=2, table="decoupled"),
    Arm(
        "ab_objects_to_scenes_10x",
        "AB_SimCLR, objects -> scenes, 10x the views",
        (*CURVE, *TWO_STREAMS, X10),
        data="scenes",
        annotations="objects",
        seeds=2,  # the second seed: where the time allows (the issue asks for >= 1 at 10x)
        table="decoupled",
    ),
    Arm(
        "simclr_10x_mix",
        "SimCLR on 50/50 objects + scenes, 10x the views",
        (*SIMCLR, *CURVE, X10),
        data="mix",
        seeds=2,  # the second seed: where the time allows (the issue asks for >= 1 at 10x)
        table="decoupled",
    ),
    Arm(
        "dino_10x_mix",
        "DINO on 50/50 objects + scenes, 10x the views",
        (*DINO, *CURVE, X10),
        data="mix",
        table="decoupled",
    ),
)


def arm_config(
    arm: Arm, seed: int, base: Config, config: str, overrides: Sequence[str], shards: dict[str, str]
) -> Config:
    """The arm's resolved config: the study's config + its overrides + the arm's, at this seed."""
    # "train.total_views=@/N": the study's views / N, equal steps with AB for a method that cuts N times
    # fewer views per image (SimCLR 2 vs AB_SimCLR's 6: N = 3; CLIP 1 vs AB_CLIP's 5: N = 5)
    # "train.total_views=@*N": N times the study's views (a larger budget, its own schedule)
    own = [scaled_views(o, base.train.total_views) for o in arm.overrides]
    data = shards["scenes"] if arm.data == "mix" else shards[arm.data]
    named = [f"train.seed={seed}", f"train.run_name=study-{arm.slug}-s{seed}", f"data.shards={data}"]
    if arm.data == "mix":  # half the images from the scenes, half from the object-centric variant
        named.append("data.mixture=" + json.dumps({shards["scenes"]: 0.5, shards["objects"]: 0.5}))
    if arm.annotations:
        named.append(f"data.annotation_shards={shards[arm.annotations]}")
    return load_config(config, [*overrides, *own, *named]).resolved()


def scaled_views(override: str, views: int) -> str:
    """ "train.total_views=@/N" -> views // N, "train.total_views=@*N" -> views * N; any other override as is."""
    for mark, scale in (("@/", lambda n: views // n), ("@*", lambda n: views * n)):
        if override.startswith(f"train.total_views={mark}"):
            return f"train.total_views={scale(int(override.split(mark)[1]))}"
    return override


def prepare_data(cfg: Config, needed: set[str], tag: str = "") -> dict[str, str]:
    """Write the scene set (once) and ingest what the arms need; returns {scenes|objects|scenes_annotated:
    shard dir}. `tag` ("_dense") names a preset's shard sets apart from the default scenes' ones."""
    from pipeline.data.scenes import annotated_subset, write_scenes
    from pipeline.ingest import run_ingest

    write_scenes(cfg.scenes)
    data = Path(cfg.scenes.output)
    needed = needed | ({"scenes", "objects"} if "mix" in needed else set())
    shards = {
        "scenes": cfg.paths.under("shards", f"scenes_{cfg.scenes.objects}{tag}"),
        "objects": cfg.paths.under("shards", f"objects_{cfg.scenes.objects}{tag}"),
        "scenes_annotated": cfg.paths.under(
            "shards", f"scenes_{cfg.scenes.objects}{tag}_annotated{ANNOTATED_FRACTION * 100:g}"
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
    from pipeline.objectives.towers import has_text_tower

    data = Path(cfg.scenes.output)
    roots = {
        "coco_objects": str(data / "scenes"),
        "coco_detection": str(data / "scenes"),
        "folder": str(data / "objects"),
    }
    probes = list(cfg.eval.probes)
    if has_text_tower(cfg.objective.name):  # the text tower's own readouts, on the scenes' val captions too
        roots["coco_captions"] = str(data / "scenes")
        probes += [p for p in TEXT_READOUTS if p not in probes]
    ev = dataclasses.replace(
        cfg.eval, checkpoint=checkpoint, tasks=list(roots), task_roots=roots, seed=seed, probes=probes
    )
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
    from pipeline.train.step import Budget
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
    steps = train["metrics"].get("step")
    views = Budget.from_config(cfg, cfg.train.world_size).views_per_step
    costs = {"views": steps * views if steps else None, "views_per_step": views}
    if "train/flops_per_step" in watch and steps:
        costs["train_flops"] = watch["train/flops_per_step"] * steps
    row = {"arm": arm.slug, "seed": seed, "run_id": train["run_id"], "steps": steps, **metrics, **watch, **timing}
    if cfg.train.checkpoint_fraction > 0:
        row.update(run_curve(cfg, train["run_id"], seed, views, watch.get("train/flops_per_step")))
    return {**row, **costs}


def run_curve(cfg: Config, run_id: str, seed: int, views_per_step: int, flops_per_step: float | None) -> dict:
    """The curve inside a run: `abpipe sweep` over every checkpoint of pretraining run `run_id` with the
    cheap probes (CURVE_PROBES on CURVE_TASKS; a checkpoint already swept is skipped, so a study resumed
    after a kill sweeps only what is left). Returns {"curve": [{step, views, flops, <task>/<metric>...}],
    "curve_eval_s", "curve_checkpoints", "curve_failures"}."""
    from pipeline.eval.sweep import run_sweep

    ev = eval_config(cfg, "", seed).eval
    roots = {t: ev.task_roots[t] for t in CURVE_TASKS}
    ev = dataclasses.replace(
        ev,
        tasks=list(roots),
        task_roots=roots,
        probes=list(CURVE_PROBES),
        random_init=False,
        max_per_split=min(ev.max_per_split or CURVE_MAX_PER_SPLIT, CURVE_MAX_PER_SPLIT),
    )
    t0 = time.perf_counter()
    result = run_sweep(dataclasses.replace(cfg, eval=ev, sweep=dataclasses.replace(cfg.sweep, runs=[run_id])))
    points: dict[int, dict] = {}
    for rec in result["records"]:
        point = points.setdefault(rec["step"], {"step": rec["step"], "views": rec["step"] * views_per_step})
        if flops_per_step:
            point["flops"] = rec["step"] * flops_per_step
        point.update({f"{rec['task']}/{k}": v for k, v in rec["metrics"].items()})
    return {
        "curve": [points[s] for s in sorted(points)],
        "curve_eval_s": round(time.perf_counter() - t0, 1),
        "curve_checkpoints": len(points),
        "curve_failures": len(result["failures"]),
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
    results: list[dict],
    arms: Sequence[Arm],
    table: str,
    metrics: Sequence[str] = tuple(METRICS),
    with_extras_only: bool = False,
) -> list[str]:
    """Markdown table of one study table: mean ± sd over seeds per metric, the random-init floor first,
    the paper's figure in brackets where it reported one for that metric. A table shows up once rows of
    its own arms exist, or (`with_extras_only`) rows of the arms it shows beside them (TABLE_EXTRA)."""
    own = {a.slug for a in arms if a.table == table or (with_extras_only and a.slug in TABLE_EXTRA.get(table, ()))}
    if not any(r["arm"] in own for r in results):
        return []
    rows = [a for a in arms if a.table == table or a.slug in TABLE_EXTRA.get(table, ())]
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


def preset_overrides(preset: str, config: str, overrides: Sequence[str]) -> list[str]:
    """The study's overrides under scene preset `preset` ("" = the default scenes): the preset's own first (the
    user's win), and the preset's scene set in a folder of its own (`data/scenes_<objects>_<preset>`)."""
    if not preset:
        return list(overrides)
    if preset not in PRESETS:
        raise ConfigError(f"unknown study preset {preset!r}; known: {', '.join(PRESETS)}")
    full = [*PRESETS[preset], *overrides]
    if not any(o.startswith("scenes.output=") for o in overrides):
        base = load_config(config, full).resolved()
        full.append(f"scenes.output={Path(base.paths.root) / 'data' / f'scenes_{base.scenes.objects}_{preset}'}")
    return full


def default_arms(preset: str = "") -> list[str]:
    """The arms a study runs when none are named: the scenes study's tables on the default scenes; on a preset,
    the curves (1x, 3x, 10x) and the decoupled setting. Other arms run when named (`--arms`)."""
    curves = [a.slug for a in ARMS if a.table in TABLE_EXTRA or a.slug in TABLE_EXTRA["curve"]]
    return curves if preset else [a.slug for a in ARMS if a.table not in TABLE_EXTRA]


def results_file(root: str, preset: str = "") -> Path:
    """`<root>/study_results.jsonl`, or `study_results_<preset>.jsonl` for a scene preset's rows."""
    return Path(root) / (f"study_results_{preset}.jsonl" if preset else "study_results.jsonl")


def run_study(
    config: str = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    arms: Sequence[str] | None = None,
    max_seeds: int | None = None,
    preset: str = "",
) -> dict:
    """Run (or resume) the study; returns the rows and the markdown tables. `preset` ("dense") runs the arms on
    that scene preset, into its own results file and shard sets under the same root."""
    overrides = preset_overrides(preset, config, overrides)
    base = load_config(config, overrides).resolved()
    unknown = sorted(set(arms or ()) - {a.slug for a in ARMS})
    if unknown:
        raise ConfigError(f"unknown study arm(s) {unknown}; known: {', '.join(a.slug for a in ARMS)}")
    selected = [a for a in ARMS if (a.slug in arms if arms is not None else a.slug in default_arms(preset))]
    results_path = results_file(base.paths.root, preset)
    lock = hold_study_lock(results_path.parent)  # noqa: F841  (held until this process ends)
    needed = {a.data for a in selected} | {a.annotations for a in selected if a.annotations}
    shards = prepare_data(base, needed, f"_{preset}" if preset else "")
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
        row = {**row, "data": arm.data, "objects": base.scenes.objects, **({"preset": preset} if preset else {})}
        done[(arm.slug, seed)] = row
        with results_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    results = list(done.values())
    tables = {t: summarise(results, selected, t) for t in TABLES}
    return {"results": results, "tables": tables, "results_file": str(results_path)}
