"""`abpipe export`: a checkpoint's ViT encoder as timm weights, with a config and a model card.

Every method trains the same timm ViT (pipeline/models/encoder.py), so one export serves all of
them: the teacher or student encoder goes out as `model.safetensors` + timm's hub-style
`config.json` (architecture, `model_args` to rebuild it, `pretrained_cfg` with abpipe's
normalisation) + `README.md` (method, data, config, probe results from MLflow). The folder loads
with `timm.create_model("local-dir:DIR", pretrained=True)`, with
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=...),
**cfg["model_args"])`, or as plain tensors with `safetensors.torch.load_file`.

Strict on both ends: the checkpoint's tensors must be exactly the timm model's (missing, unexpected
and mis-shaped keys are named, never skipped), and the written folder is loaded back through timm
and checked tensor by tensor and on features (pooled and token) against the encoder it came from
before the export counts as done. Other frameworks' exports have loaded a handful of tensors and
logged success (timm's own loader turns strict off when `num_classes` differs from its
pretrained_cfg); the `pretrained_cfg` written here carries `num_classes: 0`, so timm stays strict.

When the checkpoint belongs to an MLflow run, the folder is logged as that run's artifacts
(`export/<weights>`) and registered as a new version of a registered model (if the tracking store
has a model registry; sqlite and tracking servers do).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import console
from pipeline.checkpoints import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_config,
    encoder_state,
    file_sha256,
    load_state,
    read_meta,
    resolve_checkpoint,
)
from pipeline.config import Config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
WEIGHTS = ("teacher", "student")
PARITY_ATOL = 1e-5  # max abs difference allowed between exported and checkpoint features (CPU fp32)
# Eval-run metrics that describe the run, not the probe result (left out of the model card).
_BOOKKEEPING = ("n_train", "n_test", "features_cached", "extract_s", "eval_s")


class ExportError(RuntimeError):
    """An export that cannot be made or would not load exactly; the message says which and why."""


@dataclass
class ExportResult:
    out: str
    architecture: str
    weights: str
    tensors: int  # tensors in the timm model = tensors written = tensors loaded back
    parameters: int
    max_abs_diff: float  # exported vs checkpoint encoder, pooled and token features
    checkpoint: str
    step: int | None
    run_id: str | None
    registered: dict[str, str] = field(default_factory=dict)  # {"name", "version"} when registered

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------- tensors


def check_tensors(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> int:
    """Number of tensors, after checking `given` has exactly `expected`'s keys and shapes.

    Raises ExportError naming every missing, unexpected and mis-shaped key (first 20 of each).
    """

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20})" if len(keys) > 20 else "")

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {names(unexpected)}")
    if shapes:
        problems.append(
            f"{len(shapes)} with another shape: "
            + names([f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes])
        )
    if problems:
        raise ExportError(f"{what}: {len(given)} tensors for a model of {len(expected)}; " + "; ".join(problems))
    return len(expected)


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> int:
    """Load every tensor of `model` from `tensors` (nothing missing, nothing extra); returns the count."""
    count = check_tensors(model.state_dict(), tensors, what)
    model.load_state_dict(tensors, strict=True)
    return count


def encoder_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final tokens (B, N, D), pooled (B, D)): what the decoder/attentive and linear/kNN probes read."""
    from pipeline.models.encoder import pool_tokens

    with torch.no_grad():
        tokens = model.forward_features(x)
        return tokens, pool_tokens(model, tokens)


def max_feature_diff(a: torch.nn.Module, b: torch.nn.Module, image_size: int, seed: int = 0, n: int = 4) -> float:
    """Largest |a - b| over the token and pooled features of `n` seeded random normalised images."""
    x = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    ta, pa = encoder_features(a.eval(), x)
    tb, pb = encoder_features(b.eval(), x)
    return max((ta - tb).abs().max().item(), (pa - pb).abs().max().item())


# ----------------------------------------------------------------------------------------- timm files


def _timm_config(model: torch.nn.Module, image_size: int) -> dict[str, Any]:
    """abpipe's preprocessing as timm's pretrained_cfg: ImageNet mean/std (images_to_float), bicubic
    shorter-side resize + centre crop at the trained view size (the eval job's `crop` mode)."""
    from pipeline.models.ab_model import IMAGENET_MEAN, IMAGENET_STD

    provenance = (
        "url",
        "hf_hub_id",
        "file",
        "state_dict",
        "license",
        "origin_url",
        "paper_ids",
        "paper_name",
        "notes",
        "tag",
    )
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in provenance}
    cfg.update(
        tag="abpipe",
        custom_load=False,
        input_size=(3, image_size, image_size),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        mean=tuple(IMAGENET_MEAN),
        std=tuple(IMAGENET_STD),
        num_classes=0,
    )
    return cfg


def write_timm_folder(model: torch.nn.Module, out: Path, model_args: dict[str, Any], image_size: int) -> None:
    """model.safetensors + config.json through timm's own writer (the format timm's loaders read)."""
    from timm.models import save_for_hf

    model.pretrained_cfg = _timm_config(model, image_size)
    save_for_hf(model, str(out), model_config={"model_args": dict(model_args)}, safe_serialization=True)


def load_exported(directory: str | os.PathLike) -> tuple[torch.nn.Module, int]:
    """(timm model, tensors loaded) from an export folder, through timm's file loader, then checked
    key by key and value by value against the safetensors file it was asked to read."""
    import timm
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{directory}: unreadable {CONFIG_FILE}: {exc}") from None
    weights = directory / WEIGHTS_FILE
    overlay = dict(cfg["pretrained_cfg"], file=str(weights))  # carries num_classes=0: timm loads strictly
    model = timm.create_model(
        cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg.get("model_args", {})
    )
    tensors = load_file(str(weights))
    state = model.state_dict()
    count = check_tensors(state, tensors, f"{weights} in timm's {cfg['architecture']}")
    differ = [k for k, v in tensors.items() if not torch.equal(state[k], v)]
    if differ:
        raise ExportError(
            f"{weights}: timm did not load {len(differ)} of {count} tensors (e.g. {', '.join(differ[:5])})"
        )
    return model.eval(), count


# ----------------------------------------------------------------------------------------- model card


def probe_results(tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """Probe metrics of the eval runs of pretraining run `run_id`, in any experiment of the store."""
    from mlflow.tracking import MlflowClient

    from pipeline.eval.report import result_rows

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`abpipe.parent_run_id` = '{run_id}' and tags.`abpipe.kind` = 'eval'"
    rows = []
    for run in client.search_runs(experiments, filter_string=query, max_results=1000):
        metrics = {k: v for k, v in run.data.metrics.items() if k not in _BOOKKEEPING and not k.startswith("skipped/")}
        for metric, value, random_init in result_rows(metrics):
            rows.append(
                {
                    "task": run.data.tags.get("abpipe.task", run.info.run_name or ""),
                    "step": run.data.tags.get("abpipe.checkpoint_step", ""),
                    "metric": metric,
                    "value": value,
                    "random_init": random_init,
                    "run_id": run.info.run_id,
                }
            )
    return sorted(rows, key=lambda r: (r["task"], str(r["step"]).zfill(12), r["metric"]))


def _probe_table(rows: list[dict[str, Any]], step: int | None) -> list[str]:
    lines = ["| task | checkpoint step | metric | pretrained | random init |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " (this export)" if step is not None and str(r["step"]) == str(step) else ""
        rand = "" if r["random_init"] is None else f"{r['random_init']:.4f}"
        lines.append(f"| {r['task']} | {r['step']}{mark} | {r['metric']} | {r['value']:.4f} | {rand} |")
    return lines


_LOAD_SNIPPET = """\
```python
import json, timm
from safetensors.torch import load_file

model = timm.create_model("local-dir:.", pretrained=True)  # this folder (timm with local-dir:, e.g. {timm})
cfg = json.load(open("config.json"))  # or, with any timm >= 1.0:
overlay = dict(cfg["pretrained_cfg"], file="model.safetensors")  # all of it: num_classes=0 keeps timm strict
model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"])
tensors = load_file("model.safetensors")  # plain tensors, timm's key names
features = model.forward_head(model.forward_features(images), pre_logits=True)  # pooled, as abpipe's probes
```

Input: RGB at {size} px, ImageNet mean/std (`timm.data.resolve_data_config({{}}, model=model)`).
"""


def _described(mixture: dict[str, float], shards: str) -> str:
    return ", ".join(f"{k} (weight {w:g})" for k, w in mixture.items()) or shards


def model_card(
    cfg: Config,
    meta: dict[str, Any],
    result: ExportResult,
    sha256: str,
    probes: list[dict[str, Any]] | None,
    tracking_uri: str | None,
) -> str:
    """README.md: what the weights are, how they were trained, what probes measured, how to load them."""
    import yaml
    from timm import __version__ as timm_version

    v, t = cfg.views, cfg.train
    data = _described(cfg.data.mixture, cfg.data.shards) or "(not recorded)"
    ann = _described(cfg.data.annotation_mixture, cfg.data.annotation_shards)
    views_seen = int(meta.get("views_seen") or 0)
    workers = meta.get("world_size", t.num_workers)
    lines = [
        "---",
        "library_name: timm",
        f"tags: [image-feature-extraction, timm, abpipe, {cfg.objective.name}]",
        "---",
        "",
        f"# {t.run_name}: {cfg.objective.name} {result.architecture} encoder ({result.weights} weights)",
        "",
        (
            f"Exported by `abpipe export` from step {meta.get('step')} ({views_seen:,} views seen) of MLflow run "
            f"`{result.run_id or 'none'}`; `state.pt` sha256 `{sha256}`."
        ),
        "",
        "## Load",
        "",
        _LOAD_SNIPPET.format(timm=timm_version, size=v.view_size),
        "## Method and data",
        "",
        f"- method: `{cfg.objective.name}` ({result.weights} encoder; without a teacher, the student is both)",
        (
            f"- encoder: `{result.architecture}` {json.dumps(cfg.model.encoder_kwargs)} at {v.view_size} px, "
            f"{result.parameters:,} parameters in {result.tensors} tensors"
        ),
        f"- data: {data}" + (f"; annotations from {ann}" if ann else ""),
        (
            f"- views: {v.num_views} crops (scale {list(v.scale)}), {v.annotation_views} annotation views, "
            f"{v.local_views} local views; text annotations: {v.text.source}"
        ),
        f"- budget: {t.total_views:,} views, batch {t.batch_size} x {workers} workers, lr {t.lr:g}, seed {t.seed}",
        "",
        "## Probe results",
        "",
    ]
    if probes:
        lines += [f"Frozen-feature probes logged by `abpipe eval` in `{tracking_uri}`:", ""]
        lines += [*_probe_table(probes, meta.get("step")), ""]
    elif probes is None:
        lines += ["Not looked up: the checkpoint names no MLflow run, or the tracking store could not be read.", ""]
    else:
        lines += [
            f"No evaluation runs of this run in `{tracking_uri}` yet (`abpipe eval --checkpoint {result.run_id}`).",
            "",
        ]
    lines += [
        "## Export checks",
        "",
        f"- {result.tensors} of {result.tensors} tensors of the timm model loaded (no missing or unexpected key)",
        (
            f"- features of the exported model vs the checkpoint's encoder: max abs diff {result.max_abs_diff:.3g} "
            "(CPU fp32)"
        ),
        "",
        "## Full training config",
        "",
        "<details><summary>resolved config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=True).rstrip(),
        "```",
        "</details>",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- MLflow


def register(tracking_uri: str, run_id: str, out: str, name: str, weights: str, step: int | None) -> dict[str, str]:
    """Log `out` as the run's `export/<weights>` artifacts and register them as a new model version.

    Returns {"name", "version", "source"}, or {"skipped": reason} when the store has no registry.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import probe

    probe(tracking_uri)
    client = MlflowClient(tracking_uri)
    artifact_path = f"export/{weights}"
    client.log_artifacts(run_id, out, artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        try:
            client.create_registered_model(
                name, description="abpipe encoder exports (timm safetensors + config.json + model card)"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={"abpipe.weights": weights, "abpipe.checkpoint_step": str(step)},
            description=f"{weights} encoder at step {step}",
        )
    except MlflowException as exc:
        return {"skipped": f"the tracking store has no model registry ({exc.message.splitlines()[0]})"}
    return {"name": name, "version": str(version.version), "source": source}


# ----------------------------------------------------------------------------------------- export


def _config(ckpt_dir: str) -> Config:
    try:
        return checkpoint_config(ckpt_dir)
    except KeyError:
        raise ExportError(f"{ckpt_dir}: its {META_FILE} has no training config") from None


def export_checkpoint(
    ckpt_dir: str,
    out: str | os.PathLike,
    weights: str = "teacher",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    register_as: str | None = None,
) -> ExportResult:
    """Write the encoder of checkpoint `ckpt_dir` to `out` and check it loads exactly (see module doc).

    `run_id`: the pretraining run (default: the one recorded in the checkpoint); with `tracking_uri`
    its eval runs fill the model card and, if `register_as` is given, the export is registered.
    """
    from pipeline.models.encoder import build_encoder

    if weights not in WEIGHTS:
        raise ExportError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder")
    meta = read_meta(ckpt_dir)
    cfg = _config(ckpt_dir)
    try:
        tensors = encoder_state(load_state(ckpt_dir), weights)
    except KeyError as exc:
        raise ExportError(f"{ckpt_dir}: {exc.args[0]}") from None
    encoder = build_encoder(cfg.model, cfg.views.view_size)
    loaded = load_strict(encoder, tensors, f"{ckpt_dir} ({weights} encoder) in timm's {cfg.model.encoder}")
    run_id = run_id or meta.get("mlflow_run_id")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # moved into place when complete
    try:
        model_args = {"img_size": cfg.views.view_size, **cfg.model.encoder_kwargs, "num_classes": 0}
        write_timm_folder(encoder, staging, model_args, cfg.views.view_size)
        reloaded, count = load_exported(staging)
        if count != loaded:
            raise ExportError(f"wrote {loaded} tensors, timm loaded {count}")
        diff = max_feature_diff(encoder, reloaded, cfg.views.view_size)
        if not diff <= PARITY_ATOL:
            raise ExportError(f"exported features differ from the checkpoint's by {diff:.3g} (> {PARITY_ATOL:g})")
        result = ExportResult(
            out=str(out),
            architecture=cfg.model.encoder,
            weights=weights,
            tensors=count,
            parameters=sum(p.numel() for p in encoder.parameters()),
            max_abs_diff=diff,
            checkpoint=str(ckpt_dir),
            step=meta.get("step"),
            run_id=run_id,
        )
        probes = None
        if run_id and tracking_uri:
            try:
                probes = probe_results(tracking_uri, run_id)
            except Exception as exc:  # noqa: BLE001 - the card says it could not look; the export stands
                console.warn(f"probe results not read from {tracking_uri}: {exc}")
        sha = file_sha256(os.path.join(ckpt_dir, STATE_FILE))
        (staging / CARD_FILE).write_text(model_card(cfg, meta, result, sha, probes, tracking_uri))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if register_as and run_id and tracking_uri:
        try:
            result.registered = register(tracking_uri, run_id, str(out), register_as, weights, result.step)
        except Exception as exc:  # noqa: BLE001 - the folder is complete and checked; say why it is not in MLflow
            result.registered = {"skipped": f"{type(exc).__name__}: {exc}"}
    elif register_as:
        result.registered = {"skipped": "the checkpoint names no MLflow run"}
    if "skipped" in result.registered:
        console.warn(f"export not registered in MLflow: {result.registered['skipped']}")
    return result


def run_export(
    ref: str,
    out: str,
    weights: str = "teacher",
    tracking_uri: str | None = None,
    default_uri: str = "",
    register_model: bool = True,
    name: str | None = None,
) -> ExportResult:
    """`abpipe export REF --out DIR`: REF is a checkpoint directory, `runs:/<id>/<dir>` or a run id.

    The MLflow store is `tracking_uri` when given; else a run id is looked up in `default_uri`, and a
    checkpoint directory's run in the store its own config names (where that run was logged).
    Registered as `name` (default `abpipe-<run name>`) unless `register_model` is off.
    """
    download = tempfile.mkdtemp(prefix="abpipe-export-dl-")
    try:
        ckpt_dir, source_run, _ = resolve_checkpoint(ref, tracking_uri or default_uri, download)
        cfg = _config(ckpt_dir)
        uri = tracking_uri or (default_uri if source_run else cfg.tracking.tracking_uri) or None
        register_as = (name or f"abpipe-{cfg.train.run_name}") if register_model else None
        return export_checkpoint(ckpt_dir, out, weights, source_run, uri, register_as)
    finally:
        shutil.rmtree(download, ignore_errors=True)


__all__ = ["CheckpointError", "ExportError", "ExportResult", "export_checkpoint", "load_exported", "run_export"]
