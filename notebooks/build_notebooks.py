"""Write notebooks/quickstart.ipynb and notebooks/results.ipynb from the cell sources below.

The notebooks are generated so their code lives in one reviewable place, and committed WITH their
outputs so a reader sees the crops, curves and tables without running anything. After editing the
cells (or when the pipeline's output changes), refresh both with one command:

    .venv/bin/python notebooks/build_notebooks.py --execute

It executes the quickstart on a fresh root under /tmp (a real local Ray, a real MLflow store), then the
results notebook on that store, and writes both with their outputs. In the committed copy the fresh
root's path reads as the default `abpipe_runs/quickstart`, stderr streams (Ray's and MLflow's logs) and
per-cell timings are left out, so a refresh diffs only on what a reader sees. Without `--execute` the
notebooks are written with no outputs (tests/test_docs.py then fails until they are executed).
CI executes them again from scratch with nbclient (tests/test_notebooks.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    ("md", """# abpipe quickstart

The whole pipeline on data that ships with scikit-learn, small enough for a laptop CPU:
ingest → look at AB's crops and action tokens → pretrain AB_SimCLR with Ray Train → read the curves
back from MLflow → probe the frozen encoder.

Set `ABPIPE_ROOT` to keep the outputs somewhere else (default `abpipe_runs/quickstart`), and
`ABPIPE_QUICKSTART_STEPS` for a longer run (default 20 steps: a smoke run, not a trained model);
`ABPIPE_QUICKSTART_PER_CLASS` limits the digits per class (default: all 1,797 images)."""),
    ("code", """import dataclasses, os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from pipeline.config import load_config
from pipeline.runtime import quiet_environment

quiet_environment()
REPO = Path.cwd() if (Path.cwd() / "jobs").is_dir() else Path.cwd().parent
ROOT = os.environ.get("ABPIPE_ROOT", str(REPO / "abpipe_runs" / "quickstart"))
STEPS = int(os.environ.get("ABPIPE_QUICKSTART_STEPS", "20"))
PER_CLASS = int(os.environ.get("ABPIPE_QUICKSTART_PER_CLASS", "0")) or None
cfg = load_config(REPO / "jobs/configs/tiny.yaml", [
    f"paths.root={ROOT}", "train.run_name=quickstart", "train.log_every_steps=5", "train.checkpoint_every_steps=10",
]).resolved()
per_step = cfg.train.batch_size * (cfg.views.num_views + cfg.views.annotation_views)
cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_views=STEPS * per_step))
print(cfg.paths.root, cfg.tracking.tracking_uri)"""),
    ("md", "## 1. Ingest: an image folder → WebDataset shards + manifest (bad files are skipped and counted)"),
    ("code", """from pipeline.data.sample_data import write_digits_folder
from pipeline.ingest import run_ingest

digits = Path(cfg.paths.under("data", "digits"))
if not digits.is_dir():
    write_digits_folder(digits, size=cfg.views.view_size, per_class=PER_CLASS)
cfg = dataclasses.replace(cfg,
    ingest=dataclasses.replace(cfg.ingest, source="image_folder", input=str(digits), output=cfg.paths.under("shards", "digits")),
    data=dataclasses.replace(cfg.data, shards=cfg.paths.under("shards", "digits")))
stats = run_ingest(cfg)
stats["counts"]"""),
    ("md", """## 2. AB's views: M Inception-style crops per image, and the action tokens of a pair

Each crop's box is drawn on the image. The action for (source s, target t) is the target box's
4 corners in the source crop's frame, where the source is [0, 1]²; the identity action (t = s) is
(0, 0, 1, 1)."""),
    ("code", """from PIL import Image
from matplotlib.patches import Rectangle

from pipeline.data.views import make_views
from pipeline.objectives.ab_simclr import pair_actions
import torch

image = np.asarray(Image.open(sorted(digits.glob("*/*.png"))[7]).convert("RGB").resize((128, 128), Image.NEAREST))
views_cfg = dataclasses.replace(cfg.views, view_size=64)
out = make_views(image, np.random.default_rng(3), views_cfg)
m = views_cfg.num_views
fig, axes = plt.subplots(1, m + 1, figsize=(3 * (m + 1), 3))
axes[0].imshow(image)
colours = plt.cm.tab10.colors
for i, (x0, y0, x1, y1) in enumerate(out["boxes"] * 128):
    axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, color=colours[i]))
    axes[i + 1].imshow(out["views"][i]); axes[i + 1].set_title(f"crop {i}", color=colours[i])
for ax in axes: ax.axis("off")
plt.show()
actions = pair_actions(torch.as_tensor(out["boxes"])[None])[0]  # (M, M, 4): [source, target]
print("action tokens for source 0 -> each target (x0, y0, x1, y1 in crop 0's frame):")
print(np.round(actions[0].numpy(), 3))
assert np.allclose(actions[0, 0].numpy(), [0, 0, 1, 1], atol=1e-5)"""),
    ("md", """## 3. The scenes benchmark: real objects in scenes, with COCO boxes and generated captions

`abpipe scenes` writes the study's data (docs/study.md) in the COCO layout: 1–3 real object images per
scene (Fashion-MNIST photos in the study; scikit-learn's digits here, which need nothing installed) on
dimmed photo backgrounds, with their boxes, class names and two captions per scene."""),
    ("code", """import json

from matplotlib.patches import Rectangle
from PIL import Image

from pipeline.config import ScenesConfig
from pipeline.data.scenes import write_scenes

scenes_root = Path(cfg.paths.under("data", "scenes_digits"))
write_scenes(ScenesConfig(objects="digits", n_train=8, n_val=4, output=str(scenes_root)))
ann = scenes_root / "scenes" / "annotations"
coco = json.loads((ann / "instances_train2017.json").read_text())
captions = json.loads((ann / "captions_train2017.json").read_text())["annotations"]
names = {c["id"]: c["name"] for c in coco["categories"]}
fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
for ax, info in zip(axes, coco["images"]):
    ax.imshow(Image.open(scenes_root / "scenes" / "train2017" / info["file_name"]))
    for a in (a for a in coco["annotations"] if a["image_id"] == info["id"]):
        x, y, w, h = a["bbox"]
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=2, color="yellow"))
        ax.text(x, y - 1, names[a["category_id"]], color="yellow", fontsize=9, va="bottom")
    ax.set_title(next(c["caption"] for c in captions if c["image_id"] == info["id"]), fontsize=9)
    ax.axis("off")
plt.tight_layout(); plt.show()
len(coco["images"]), len(coco["annotations"])"""),
    ("md", "## 4. Pretrain AB_SimCLR through Ray Train (local Ray; MLflow on a local sqlite store)"),
    ("code", """from pipeline.train.trainer import run_pretrain

train = run_pretrain(cfg)
train["run_id"], train["checkpoint"]"""),
    ("md", "## 5. Training curves, read back from MLflow"),
    ("code", """from mlflow.tracking import MlflowClient

client = MlflowClient(cfg.tracking.tracking_uri)
keys = ["loss", "loss_annotation", "loss_propagation", "teacher_entropy", "rankme_encoder", "lr"]
fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
for ax, key in zip(axes, keys):
    hist = sorted(client.get_metric_history(train["run_id"], key), key=lambda m: m.step)
    ax.plot([m.step for m in hist], [m.value for m in hist], marker=".")
    ax.set_title(key); ax.set_xlabel("step")
plt.tight_layout(); plt.show()
curves = {k: len(client.get_metric_history(train["run_id"], k)) for k in keys}
assert all(curves.values()), curves
curves"""),
    ("md", "## 6. Probe the frozen encoder (kNN + linear), next to its random initialisation"),
    ("code", """from pipeline.eval.job import run_eval

ev_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint=train["run_id"], dataset=str(digits), linear_epochs=100))
evaluation = run_eval(ev_cfg)
{k: round(v, 3) for k, v in evaluation["metrics"].items() if isinstance(v, float)}"""),
    ("md", "Everything above is in MLflow: `mlflow ui --backend-store-uri " + "<tracking uri printed in the first cell>`."),
]

RESULTS = [
    ("md", """# abpipe results: methods × tasks, and propagation error vs IoU

Reads the pretraining and eval runs of an MLflow store (`ABPIPE_TRACKING_URI`, default the
quickstart's `sqlite:///abpipe_runs/quickstart/mlflow.db`) and draws the comparison table and the
AB diagnostics (propagation error binned by source/target IoU, Fig. 3 bottom of the paper)."""),
    ("code", """import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow.tracking import MlflowClient

REPO = Path.cwd() if (Path.cwd() / "jobs").is_dir() else Path.cwd().parent
URI = os.environ.get("ABPIPE_TRACKING_URI", f"sqlite:///{REPO / 'abpipe_runs' / 'quickstart' / 'mlflow.db'}")
client = MlflowClient(URI)
experiments = client.search_experiments()
runs = client.search_runs([e.experiment_id for e in experiments], max_results=5000)
kinds = pd.Series([r.data.tags.get("abpipe.kind", "") for r in runs]).value_counts()
kinds"""),
    ("md", "## Methods × eval metrics (one row per pretraining run; latest eval of each)"),
    ("code", """pretrain = {r.info.run_id: r for r in runs if r.data.tags.get("abpipe.kind") == "pretrain"}
rows = []
for r in sorted(runs, key=lambda r: r.info.start_time):
    if r.data.tags.get("abpipe.kind") != "eval":
        continue
    parent = pretrain.get(r.data.tags.get("abpipe.parent_run_id", ""))
    if parent is None:
        continue
    row = {"run": parent.info.run_name, "method": parent.data.tags.get("abpipe.objective", "?"), "step": r.data.tags.get("abpipe.checkpoint_step", "")}
    row.update({k: v for k, v in r.data.metrics.items() if not k.startswith(("random_init/", "skipped_", "n_"))})
    rows.append(row)
table = pd.DataFrame(rows).drop_duplicates(subset=["run"], keep="last").set_index("run") if rows else pd.DataFrame()
table"""),
    ("md", "## Propagation error by source/target IoU over training (AB runs)"),
    ("code", """fig, ax = plt.subplots(figsize=(6, 3.5))
plotted = 0
for run_id, r in pretrain.items():
    for key in sorted(k for k in r.data.metrics if k.startswith("prop_error_iou_")):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=f"{r.info.run_name} IoU {key.rsplit('_', 1)[-1]}")
        plotted += 1
ax.set_xlabel("step"); ax.set_ylabel("propagation soft-CE"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()
plotted"""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "results.ipynb": RESULTS}
DEFAULT_ROOT = "abpipe_runs/quickstart"  # what the quickstart's root reads as in committed outputs
EXECUTE_STEPS = 60  # the committed quickstart's run: enough logged points for its curves (20 by default)


def execute(nb: nbformat.NotebookNode, env: dict[str, str], timeout: int = 1200) -> nbformat.NotebookNode:
    """Run every cell in a real kernel started in notebooks/ with `env` added to its environment."""
    from nbclient import NotebookClient

    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def for_commit(nb: nbformat.NotebookNode, root: str) -> nbformat.NotebookNode:
    """Drop stderr streams and timings; the temporary root's path reads as the default root."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                continue
            if out.output_type == "stream":
                out.text = out.text.replace(root, DEFAULT_ROOT)
            for kind, value in out.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    out["data"][kind] = value.replace(root, DEFAULT_ROOT)
            kept.append(out)
        cell.outputs = kept
    return nb


def execute_all() -> None:
    """Quickstart on a fresh root, then the results notebook on its MLflow store; both written with outputs."""
    root = tempfile.mkdtemp(prefix="abpnb-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        quick = execute(build(QUICKSTART), {"ABPIPE_ROOT": root, "ABPIPE_RAY_TMP": os.path.join(root, "ray"),
                                            "ABPIPE_QUICKSTART_STEPS": str(EXECUTE_STEPS)})
        results = execute(build(RESULTS), {"ABPIPE_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
        for name, nb in (("quickstart.ipynb", quick), ("results.ipynb", results)):
            nbformat.write(for_commit(nb, root), HERE / name)
            print("wrote", HERE / name, "(executed)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true",
                        help="run both notebooks and keep their outputs (5-10 min on 2 cores)")
    if parser.parse_args().execute:
        execute_all()
    else:
        for name, cells in NOTEBOOKS.items():
            nbformat.write(build(cells), HERE / name)
            print("wrote", HERE / name, "(no outputs: run with --execute before committing)")
