"""The evaluation job: frozen-feature probes of one checkpoint on a list of tasks, as MLflow runs.

One MLflow run per (checkpoint, task), nested under the pretraining run and tagged with the
checkpoint key, the task and a signature of the eval settings: that pair is the unit a sweep
skips once done, so a failure on one task never throws away the others.

Phases, per checkpoint: (1) load every task's examples (pipeline.eval.tasks); (2) one Ray Data pass
extracts the features every task still lacks (GPU if the cluster has one), loading each model once,
and the feature cache (pipeline.eval.cache) keeps them per task split; (3) every probe x encoder x
task is its own Ray task, all submitted before any is awaited, so they train in parallel; beside them,
the readouts of a text-tower method's image and text towers (`zero_shot`, `retrieval`,
pipeline.eval.zero_shot) run as Ray tasks of their own on the model itself; (4) each task's run gets
its metrics, a results table and a plot.

Every probe also runs on the *randomly initialised* encoder the pretraining started from (same
config, same seed): a random ViT is a surprisingly strong kNN baseline on easy data, so only the
difference says whether pretraining helped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from pipeline import console
from pipeline.checkpoints import (
    CheckpointError,
    check_reference,
    checkpoint_key,
    read_meta,
    resolve_checkpoint,
    weights_fingerprint,
)
from pipeline.config import Config, ConfigError, EvalConfig
from pipeline.eval.random_init import random_init_fingerprint, write_random_init
from pipeline.eval.report import RANDOM_PREFIX, plot_eval, result_rows, write_eval_results
from pipeline.runtime import init_ray

log = logging.getLogger("abpipe.eval")

DEFAULT_TASK = "folder"
BOX_TASK_KINDS = ("box_classification", "detection")
SPLITS = ("train", "test")
# eval.* settings that do not change a result: left out of the signature that marks a pair done
_NOT_IN_SIGNATURE = ("checkpoint", "dataset", "tasks", "task_roots", "cache_dir", "use_gpu", "batch_size")
# settings added after eval runs were recorded: at these defaults they stay out of the signature, so
# the pairs done before them are not evaluated again
_SIGNATURE_SINCE = {"zero_shot_templates": []}

__all__ = [
    "EvalError",
    "RANDOM_PREFIX",
    "check_probe_names",
    "evaluate_checkpoint",
    "resolve_checkpoint",
    "run_eval",
    "task_roots",
]


class EvalError(RuntimeError):
    """Some tasks of an evaluation failed; `failures` maps task -> message (naming the file)."""

    def __init__(self, failures: dict[str, str], result: dict[str, Any] | None = None):
        super().__init__("; ".join(f"task '{t}': {m}" for t, m in failures.items()))
        self.failures = failures
        self.result = result  # what the tasks that did finish gave (the CLI still prints their table)


# ------------------------------------------------------------------------------------------- tasks


def task_roots(ev: EvalConfig) -> dict[str, str]:
    """Task name -> dataset root, in `eval.tasks` order; `eval.dataset` is the `folder` task's root."""
    tasks = list(dict.fromkeys(ev.tasks)) or [DEFAULT_TASK]
    roots = dict(ev.task_roots)
    if ev.dataset and DEFAULT_TASK not in roots:
        roots[DEFAULT_TASK] = ev.dataset
    missing = [t for t in tasks if not roots.get(t)]
    if missing:
        hint = " (or eval.dataset)" if DEFAULT_TASK in missing else ""
        raise ConfigError(
            f"eval.task_roots: no dataset root for task(s) {missing}{hint}; give eval.task_roots.<task>=PATH"
        )
    return {t: roots[t] for t in tasks}


def eval_signature(ev: EvalConfig, task: str, root: str) -> str:
    """Digest of everything that shapes a (checkpoint, task) result besides the weights."""
    from pipeline.eval.cache import digest

    settings = {
        k: v
        for k, v in dataclasses.asdict(ev).items()
        if k not in _NOT_IN_SIGNATURE and not (k in _SIGNATURE_SINCE and v == _SIGNATURE_SINCE[k])
    }
    return digest({"task": task, "root": os.path.abspath(root) if "://" not in root else root, **settings})[:16]


def check_probe_names(ev: EvalConfig) -> None:
    from pipeline.eval.probes import PROBES

    unknown = [p for p in ev.probes if p not in PROBES]
    if unknown or not ev.probes:
        raise ConfigError(f"eval.probes: unknown {unknown or '(empty)'}; known: {', '.join(PROBES)}")
    if "zero_shot" in ev.probes:
        from pipeline.eval.zero_shot import check_templates

        try:
            check_templates(ev.zero_shot_templates)
        except ValueError as exc:
            raise ConfigError(f"eval.zero_shot_templates: {str(exc).removeprefix('templates: ')}") from None


def text_tower_reason(model_cfg: Config) -> str | None:
    """Why the checkpoint's method cannot run the text-tower readouts (zero_shot, retrieval); None if it can."""
    from pipeline.objectives.towers import has_text_tower

    name = model_cfg.objective.name
    try:
        has_towers = has_text_tower(name)
    except ConfigError as exc:
        return f"its objective is not one this abpipe builds ({exc})"
    if has_towers:
        return None
    return f"its method '{name}' has no text tower"


def select_probes(ev: EvalConfig, kind: str) -> list[str]:
    """The `eval.probes` that read this task kind (a box task skips kNN/linear, and so on).

    Raises ValueError (a failure of this task alone) when none does."""
    from pipeline.eval.probes import PROBES

    chosen = [p for p in ev.probes if kind in PROBES[p].kinds]
    if not chosen:
        fitting = [name for name, p in PROBES.items() if kind in p.kinds]
        raise ValueError(f"eval.probes: none of {ev.probes} reads {kind} tasks; add one of {fitting}")
    return chosen


def check_class_ids(data, root: str, max_per_split: int = 0) -> None:
    """A label outside the class list, or test classes the train split never shows, is a dataset error."""
    from pipeline.eval.tasks import TaskFormatError

    n = data.info.num_classes
    ids: dict[str, set[int]] = {}
    for split, examples in (("train", data.train), ("test", data.test)):
        if not examples:
            raise TaskFormatError(f"{root}: task '{data.info.name}' has no {split} examples")
        seen = ids.setdefault(split, set())
        for ex in examples:
            labels = (
                [ex.label]
                if ex.label is not None
                else np.asarray(ex.box_labels if ex.box_labels is not None else [], np.int64).tolist()
            )
            for label in labels:
                if not 0 <= int(label) < n:
                    raise TaskFormatError(f"{ex.input}: class id {label} outside the task's {n} classes ({root})")
                seen.add(int(label))
    unseen = sorted(ids["test"] - ids["train"])
    hint = f" (eval.max_per_split={max_per_split} may be too small for {n} classes)" if max_per_split else ""
    if unseen and data.info.kind not in BOX_TASK_KINDS:
        names = [data.info.class_names[i] for i in unseen[:5]]
        raise TaskFormatError(
            f"{root}: class-count mismatch: the test split has {len(ids['test'])} classes, the train split "
            f"{len(ids['train'])}; "
            f"test classes never seen in training: {names}{' ...' if len(unseen) > 5 else ''}{hint}"
        )


def _probe_split(examples, kept: np.ndarray, pooled: np.ndarray, tokens: np.ndarray | None, kind: str):
    from pipeline.eval.probe_data import ProbeSplit

    rows = [examples[i] for i in kept]
    if kind in BOX_TASK_KINDS:
        empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        return ProbeSplit(
            pooled=np.asarray(pooled),
            tokens=None if tokens is None else np.asarray(tokens),
            boxes=[np.asarray(ex.boxes, np.float32) if ex.boxes is not None else empty_boxes for ex in rows],
            box_labels=[
                np.asarray(ex.box_labels, np.int64) if ex.box_labels is not None else empty_labels for ex in rows
            ],
        )
    return ProbeSplit(
        pooled=np.asarray(pooled),
        tokens=None if tokens is None else np.asarray(tokens),
        labels=np.asarray([ex.label for ex in rows], np.int64),
    )


# ------------------------------------------------------------------------------------- one task's run


@dataclasses.dataclass
class _Encoder:
    """An encoder to read features from; `directory` None = the random-init reference, written on a cache miss."""

    name: str  # pretrained | random
    fingerprint: str
    directory: str | None


@dataclasses.dataclass
class _TaskRun:
    """One (checkpoint, task) evaluation as it moves through the phases; `error` set = it failed."""

    task: str
    root: str
    run_id: str
    logger: Any
    started: float
    data: Any = None
    probes: list[str] = dataclasses.field(default_factory=list)
    tokens: bool = False
    resize: str = "crop"
    features: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # encoder -> split -> CachedFeatures
    cached: list[str] = dataclasses.field(default_factory=list)
    extract_s: float = 0.0
    pending: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)  # (metric prefix, probe, ObjectRef)
    readouts: list[str] = dataclasses.field(default_factory=list)  # MODEL_READOUTS to run on the model itself
    skipped_readouts: dict[str, str] = dataclasses.field(default_factory=dict)  # readout -> why not run
    error: str | None = None

    def fail(self, exc: BaseException) -> None:
        self.error = _describe(exc)
        self.logger.tags({"abpipe.error": self.error[:5000]})
        self.logger.finish("FAILED")
        log.warning("task '%s' failed: %s", self.task, self.error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):  # KeyError's str() wraps the message in quotes
        return f"KeyError: {exc.args[0] if exc.args else exc}"
    return f"{type(exc).__name__}: {exc}"


def _open_task(tr: _TaskRun, ev: EvalConfig, no_text_tower: str | None = None) -> None:
    """Phase 1: the task's examples, validated, and what its probes need (tokens, resize mode).

    `tr.probes` are the feature probes, `tr.readouts` the model readouts; with `no_text_tower` (the
    reason) the readouts are recorded as skipped instead."""
    from pipeline.eval.probes import MODEL_READOUTS, PROBES
    from pipeline.eval.task_formats.captions import CAPTIONS
    from pipeline.eval.tasks import load_task

    tr.data = load_task(tr.task, tr.root, max_per_split=ev.max_per_split or None, seed=ev.seed)
    if tr.data.info.kind != CAPTIONS:  # a captions task has no classes
        check_class_ids(tr.data, tr.root, ev.max_per_split)
    chosen = select_probes(ev, tr.data.info.kind)
    tr.probes = [p for p in chosen if p not in MODEL_READOUTS]
    tr.readouts = [p for p in chosen if p in MODEL_READOUTS]
    if no_text_tower and tr.readouts:
        tr.skipped_readouts = {p: no_text_tower for p in tr.readouts}
        tr.readouts = []
    tr.tokens = any(PROBES[p].needs_tokens for p in tr.probes)
    tr.resize = "stretch" if tr.data.info.kind in BOX_TASK_KINDS else "crop"


def _gather_features(
    runs: list[_TaskRun],
    encoders: list[_Encoder],
    model_cfg: Config,
    image_size: int,
    ev: EvalConfig,
    use_gpu: bool,
    cache,
    tmp: str,
) -> None:
    """Phase 2: cache hits, then one extraction pass over every task split that missed."""
    from pipeline.eval.cache import CachedFeatures, make_key
    from pipeline.eval.features import extract_features_multi

    keys, misses = {}, []
    for tr in runs:
        for enc in encoders:
            for split in SPLITS:
                inputs = [ex.input for ex in getattr(tr.data, split)]
                keys[(tr.task, enc.name, split)] = make_key(
                    enc.fingerprint, ev.weights, tr.task, tr.root, split, inputs, image_size, tr.resize
                )
                tr.features.setdefault(enc.name, {})[split] = cache.get(keys[(tr.task, enc.name, split)], tr.tokens)
                if tr.features[enc.name][split] is None:
                    misses.append((tr, enc))
        tr.cached = [e.name for e in encoders if all(tr.features[e.name][s] is not None for s in SPLITS)]
    if not misses:
        return
    todo_runs = list({id(tr): tr for tr, _ in misses}.values())
    todo_encoders = [e for e in encoders if any(e is enc for _, enc in misses)]
    for enc in todo_encoders:
        if enc.directory is None:
            enc.directory = write_random_init(model_cfg, os.path.join(tmp, "random_init"))
    inputs, modes, spans = [], [], {}
    for tr in todo_runs:
        for split in SPLITS:
            paths = [ex.input for ex in getattr(tr.data, split)]
            spans[(tr.task, split)] = (len(inputs), len(inputs) + len(paths))
            inputs += paths
            modes += [tr.resize] * len(paths)
    started = time.perf_counter()
    try:
        got = extract_features_multi(
            {e.name: e.directory for e in todo_encoders},
            inputs,
            image_size,
            ev.batch_size,
            which=ev.weights,
            use_gpu=use_gpu,
            tokens=any(tr.tokens for tr in todo_runs),
            resize=modes,
        )
    except CheckpointError:
        raise
    except Exception as exc:  # the pass failed as a whole: every task that needed it fails
        for tr in todo_runs:
            tr.fail(exc)
        return
    elapsed = time.perf_counter() - started
    for tr in todo_runs:
        tr.extract_s = elapsed
        for split in SPLITS:
            lo, hi = spans[(tr.task, split)]
            rows = (got.kept >= lo) & (got.kept < hi)
            for enc in todo_encoders:
                if tr.features[enc.name][split] is not None:
                    continue
                tokens = got.tokens[enc.name][rows] if tr.tokens else None
                feats = CachedFeatures(
                    got.pooled[enc.name][rows], tokens, got.kept[rows] - lo, got.skipped_between(lo, hi)
                )
                cache.put(keys[(tr.task, enc.name, split)], feats)
                tr.features[enc.name][split] = feats


def _submit_probes(tr: _TaskRun, probe_ev: EvalConfig, use_gpu: bool, ckpt_dir: str) -> None:
    """Phase 3: one Ray task per probe x encoder, and one per model readout (pretrained weights only:
    they read the towers of `ckpt_dir`); awaited in phase 4, after every task has submitted."""
    import ray

    from pipeline.eval.probes import PROBES

    kind = tr.data.info.kind
    for readout in tr.readouts:
        ref = _readout_task.options(
            num_cpus=1, num_gpus=1 if use_gpu else 0, name=f"readout-{readout}-{tr.task}"
        ).remote(readout, ckpt_dir, tr.data.test, tr.data.info, probe_ev)
        tr.pending.append(("", readout, ref))
    for encoder, prefix in (("pretrained", ""), ("random", RANDOM_PREFIX)):
        if not tr.probes:
            break
        if encoder not in tr.features:
            continue
        splits = {
            s: _probe_split(getattr(tr.data, s), f.kept, f.pooled, f.tokens, kind)
            for s, f in tr.features[encoder].items()
        }
        for s, split in splits.items():
            if len(split) == 0:
                raise ValueError(
                    f"{tr.root}: no readable image in the {s} split of task '{tr.task}' (skipped: "
                    f"{tr.features[encoder][s].skipped})"
                )
        train, test = ray.put(splits["train"]), ray.put(splits["test"])
        for probe in tr.probes:
            gpu = 1 if use_gpu and PROBES[probe].needs_tokens else 0
            ref = _probe_task.options(num_cpus=1, num_gpus=gpu, name=f"probe-{probe}-{tr.task}").remote(
                probe, train, test, tr.data.info, probe_ev
            )
            tr.pending.append((prefix, probe, ref))


def _run_probe(name: str, train, test, task_info, cfg: EvalConfig) -> dict[str, float]:
    import warnings

    from pipeline.eval.probes import PROBES

    with warnings.catch_warnings():  # Ray hands arrays over read-only (zero-copy); probes only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return PROBES[name](train, test, task_info, cfg)


_probe_task = None  # the Ray remote of _run_probe, made on first use (ray is imported lazily)


def _run_readout(name: str, ckpt_dir: str, examples, task_info, cfg: EvalConfig) -> dict[str, Any]:
    from pipeline.eval.zero_shot import run_readout

    return run_readout(
        name, ckpt_dir, examples, task_info, cfg.weights, cfg.zero_shot_templates, cfg.batch_size, bool(cfg.use_gpu)
    )


_readout_task = None  # the Ray remote of _run_readout


def _finish_task(tr: _TaskRun, info_base: dict[str, Any], step: int, tmp: str, bar=None) -> dict[str, Any]:
    """Phase 4: collect the probes' metrics, log them with the results table and plot, close the run."""
    import ray

    from pipeline.eval.probes import MODEL_READOUTS

    metrics: dict[str, float] = {}
    errors = []
    read: dict[str, dict[str, Any]] = {}  # readout -> its {"metrics", "skipped", "n_images"}
    for prefix, probe, ref in tr.pending:
        if bar is not None:
            ray.wait([ref], fetch_local=False)
            bar.update(1, task=tr.task)
        try:
            if probe in MODEL_READOUTS:
                read[probe] = ray.get(ref)
                metrics.update({k: float(v) for k, v in read[probe]["metrics"].items()})
                continue
            for key, value in ray.get(ref).items():
                name = key if key.startswith(probe) else f"{probe}_{key}"  # rankme's `rankme` stays `rankme`
                metrics[f"{prefix}{name}"] = float(value)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            errors.append(
                f"probe '{probe}' ({'random init' if prefix else 'pretrained'}): {type(cause).__name__}: {cause}"
            )
    if errors:
        raise RuntimeError("; ".join(errors))
    pre = tr.features.get("pretrained")  # None: no feature probe ran on this task (readouts only)
    skipped = {f"{s}/{reason}": n for s in SPLITS for reason, n in (pre[s].skipped.items() if pre else ())}
    for reason, n in getattr(tr.data, "skipped", {}).items():
        skipped[reason] = skipped.get(reason, 0) + n
    for readout, out in read.items():  # what each readout left out of the images it read itself
        skipped.update({f"{readout}/{reason}": n for reason, n in out["skipped"].items()})
    info = {
        **info_base,
        "task": tr.task,
        "root": tr.root,
        "kind": tr.data.info.kind,
        "n_classes": tr.data.info.num_classes,
        "n_train": len(pre["train"].kept) if pre else 0,
        "n_test": len(pre["test"].kept) if pre else max((r["n_images"] for r in read.values()), default=0),
        "skipped": skipped,
        "cached": tr.cached,
    }
    bookkeeping = {"n_train": info["n_train"], "n_test": info["n_test"]}
    if tr.features:
        bookkeeping.update(features_cached=float(len(tr.cached) == len(tr.features)), extract_s=tr.extract_s)
    tr.logger.metrics(
        {
            **metrics,
            **{f"skipped/{k}": v for k, v in skipped.items()},
            **bookkeeping,
            "eval_s": time.perf_counter() - tr.started,
        },
        step=step,
    )
    if tr.skipped_readouts:
        tr.logger.tags(
            {"abpipe.skipped_readouts": "; ".join(f"{p}: {why}" for p, why in tr.skipped_readouts.items())[:5000]}
        )
    rows = result_rows(metrics)
    out = os.path.join(tmp, f"results-{tr.task}")
    os.makedirs(out, exist_ok=True)
    paths = write_eval_results(out, rows, info)
    if rows:
        paths.append(plot_eval(os.path.join(out, "results.png"), rows, f"{tr.task} @ step {info['step']}"))
    for path in paths:
        tr.logger.artifact(path)
    tr.logger.finish()
    return {
        "run_id": tr.run_id,
        "metrics": metrics,
        "rows": rows,
        "skipped_readouts": dict(tr.skipped_readouts),
        **{k: info[k] for k in ("kind", "n_train", "n_test", "n_classes", "skipped", "cached")},
    }


# ---------------------------------------------------------------------------------------------- job


def _use_gpu(ev: EvalConfig) -> bool:
    import ray

    if ev.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(ev.use_gpu)


def _parent_info(uri: str, parent: str | None) -> tuple[str | None, str, dict[str, str]]:
    """(experiment name of the pretraining run, its run name, its tags); empty where it is not in this store."""
    if not parent:
        return None, "", {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        run = client.get_run(parent)
        return client.get_experiment(run.info.experiment_id).name, run.info.run_name or "", dict(run.data.tags)
    except Exception:
        return None, "", {}


def evaluate_checkpoint(
    cfg: Config, ref: str, tasks: dict[str, str] | None = None, key: str | None = None, start=None
) -> dict[str, Any]:
    """Probe checkpoint `ref` on `tasks` (name -> root; default from eval.tasks); one MLflow run per task.

    `start(experiment, run_name, params, tags) -> run id | None` opens each task's run (default:
    tracking.start_run); a sweep passes one that claims the pair and returns None when another sweep
    holds it, and that task is then left out (listed in `claimed_elsewhere`).

    Raises CheckpointError when the checkpoint itself is unusable (missing, corrupt, wrong weights).
    A task that fails (wrong dataset format, class-count mismatch, probe error) is recorded in
    `failures` with its message, its run is marked FAILED, and the other tasks still run.
    """
    from pipeline.eval.cache import FeatureCache
    from pipeline.tracking import RunLogger, start_run

    global _probe_task, _readout_task
    cfg = cfg.resolved()
    ev = cfg.eval
    tasks = tasks if tasks is not None else task_roots(ev)
    if ev.weights not in ("teacher", "student"):
        raise ConfigError(f"eval.weights: teacher or student, got {ev.weights!r}")
    check_reference(ref)  # a wrong checkpoint path fails here, before the probes' import of torch
    check_probe_names(ev)
    from pipeline.eval.probes import MODEL_READOUTS

    uri = cfg.tracking.tracking_uri
    cache = FeatureCache(ev.cache_dir or cfg.paths.under("feature_cache"))

    with tempfile.TemporaryDirectory(prefix="abpipe-eval-") as tmp:
        ckpt_dir, source_run, recorded_path = resolve_checkpoint(ref, uri, os.path.join(tmp, "download"))
        # torch, timm and Ray are imported once the reference resolves: a wrong path fails in a second
        import ray

        from pipeline.models.encoder import load_frozen_model

        # validates the weights on the driver: clear errors
        _, model_cfg = load_frozen_model(ckpt_dir, which=ev.weights)
        init_ray(cfg.ray)  # after the checkpoint checks: a bad path fails in a second, not after Ray's start-up
        _probe_task = _probe_task or ray.remote(max_retries=0)(_run_probe)
        _readout_task = _readout_task or ray.remote(max_retries=0)(_run_readout)
        use_gpu = _use_gpu(ev)
        probe_ev = dataclasses.replace(ev, use_gpu=use_gpu)
        meta = read_meta(ckpt_dir)
        fingerprint = weights_fingerprint(ckpt_dir)
        key = key or checkpoint_key(meta, source_run, fingerprint)
        parent = meta.get("mlflow_run_id") or source_run
        experiment, parent_name, parent_tags = _parent_info(uri, parent)
        image_size = model_cfg.views.view_size  # the ViT's position embeddings fix its input size
        if ev.image_size and ev.image_size != image_size:
            log.warning(
                "eval.image_size=%d ignored: the checkpoint's encoder takes %d px inputs (views.view_size)",
                ev.image_size,
                image_size,
            )
        no_text_tower = None
        wanted = [p for p in MODEL_READOUTS if p in ev.probes]
        if wanted:
            no_text_tower = text_tower_reason(model_cfg)
            if no_text_tower:  # the one line that says so; the feature probes still run
                log.warning(
                    "%s skipped: checkpoint %s: %s (these read the image and text towers of clip, slip, silc and "
                    "ab_clip); the other probes still run",
                    " and ".join(wanted),
                    recorded_path,
                    no_text_tower,
                )
        encoders = [_Encoder("pretrained", fingerprint, ckpt_dir)]
        if ev.random_init:
            encoders.append(_Encoder("random", random_init_fingerprint(model_cfg), None))
        tags = {
            "abpipe.kind": "eval",
            "abpipe.checkpoint_path": recorded_path,
            "abpipe.checkpoint_step": str(meta.get("step", "")),
            "abpipe.checkpoint_key": key,
            "abpipe.objective": parent_tags.get("abpipe.objective") or model_cfg.objective.name,
            "abpipe.pretrain_run_name": parent_name or model_cfg.train.run_name,
        }
        if parent:
            tags["abpipe.parent_run_id"] = parent
            if experiment:
                tags["mlflow.parentRunId"] = parent  # nested in the MLflow UI (same experiment)
        params = {
            k: v
            for k, v in cfg.flat().items()
            if k.startswith("eval.") and k not in ("eval.tasks", "eval.task_roots", "eval.dataset")
        }
        params.update({"eval.image_size": image_size, "eval.use_gpu": use_gpu})

        runs: list[_TaskRun] = []
        claimed_elsewhere = []
        start = start or (lambda *args: start_run(uri, *args))
        for task, root in tasks.items():
            run_tags = {
                **tags,
                "abpipe.task": task,
                "abpipe.task_root": root,
                "abpipe.eval_signature": eval_signature(ev, task, root),
            }
            run_id = start(
                experiment or cfg.tracking.experiment,
                f"eval/{task}",
                {**params, "eval.task": task, "eval.task_root": root},
                run_tags,
            )
            if run_id is None:
                claimed_elsewhere.append(task)
                continue
            tr = _TaskRun(task, root, run_id, RunLogger(uri, run_id), time.perf_counter())
            runs.append(tr)
            try:
                _open_task(tr, ev, no_text_tower)
            except Exception as exc:  # one task's bad data must not stop the others
                tr.fail(exc)
        results: dict[str, dict[str, Any]] = {}
        try:
            _gather_features(
                [tr for tr in runs if not tr.error and tr.probes],
                encoders,
                model_cfg,
                image_size,
                ev,
                use_gpu,
                cache,
                tmp,
            )
            for tr in runs:
                if not tr.error:
                    try:
                        _submit_probes(tr, probe_ev, use_gpu, ckpt_dir)
                    except Exception as exc:
                        tr.fail(exc)
            info_base = {"checkpoint": recorded_path, "step": meta.get("step", "?")}
            n_probes = sum(len(tr.pending) for tr in runs if not tr.error)
            with console.progress("eval probes", total=n_probes, unit="probe") as bar:
                for tr in runs:
                    if not tr.error:
                        try:
                            results[tr.task] = _finish_task(tr, info_base, int(meta.get("step") or 0), tmp, bar)
                        except Exception as exc:
                            tr.fail(exc)
        except BaseException as exc:  # a checkpoint error or an interrupt: no run stays RUNNING
            for tr in runs:
                if not tr.error and tr.task not in results:
                    tr.fail(exc)
            raise
    failures = {tr.task: tr.error for tr in runs if tr.error}
    return {
        "checkpoint": recorded_path,
        "checkpoint_key": key,
        "step": meta.get("step"),
        "parent_run_id": parent,
        "tasks": results,
        "failures": failures,
        "claimed_elsewhere": claimed_elsewhere,
        "metrics": _flat_metrics(results, len(tasks)),
    }


def _flat_metrics(results: dict[str, dict], n_tasks: int) -> dict[str, float]:
    """One task: its metrics as they are (`knn_top1`, the single-dataset eval's shape that the demo
    and the study read); several: prefixed `<task>/knn_top1`."""
    if n_tasks == 1:
        return next((dict(r["metrics"]) for r in results.values()), {})
    return {f"{t}/{k}": v for t, r in results.items() for k, v in r["metrics"].items()}


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    """The eval summary table: per task its split sizes, then each metric, pretrained next to random init."""
    rows: list[tuple] = []
    for task, res in result.get("tasks", {}).items():
        cached = f", features cached: {', '.join(res['cached'])}" if res.get("cached") else ""
        skipped = ", skipped " + ", ".join(f"{k} {v}" for k, v in res["skipped"].items()) if res.get("skipped") else ""
        rows.append((f"{task} ({res['n_train']} train / {res['n_test']} test{skipped}{cached})", None, None))
        rows += [(f"  {key}", value, ref) for key, value, ref in res["rows"]]
        rows += [(f"  {name}: skipped, {why}", None, None) for name, why in res.get("skipped_readouts", {}).items()]
    rows += [(f"{task}: FAILED", None, None) for task in result.get("failures", {})]
    return ["task / metric", "pretrained", "random init"], rows


def run_eval(cfg: Config) -> dict[str, Any]:
    """`abpipe eval`: probe `eval.checkpoint` on `eval.tasks`; raises EvalError if any task failed."""
    cfg = cfg.resolved()
    if not cfg.eval.checkpoint:
        raise ConfigError(
            "eval.checkpoint: give a checkpoint directory, runs:/<run id>/<dir>, or a pretraining MLflow run id"
        )
    tasks = task_roots(cfg.eval)
    result = evaluate_checkpoint(cfg, cfg.eval.checkpoint, tasks)
    if result["failures"]:
        raise EvalError(result["failures"], result)
    return result
