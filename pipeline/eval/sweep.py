"""`abpipe sweep`: evaluate every checkpoint x task of one or many pretraining runs, idempotently.

Safe to run from cron or as a scheduled Ray job: the MLflow store is the to-do list. A pair
(checkpoint, task) is done when a FINISHED eval run carries its checkpoint key, task and eval-settings
signature; done pairs are skipped, so a sweep killed midway resumes where it stopped (a run left
RUNNING by the kill is not FINISHED, so its pair is redone once its claim has expired, see
`PairClaims`). Sweeps running at once claim each pair on the tracking server before evaluating
it, so no pair is evaluated twice. A pair that fails (missing or corrupt checkpoint, task data in
the wrong format, class-count mismatch) is recorded with the error, which names the file, and the
sweep carries on; the next sweep retries it.

Checkpoints of a pretraining run are found in its Ray Train storage (`<train.storage_path>/<run
name>/checkpoint_*`, a local folder or object storage such as s3://) and in its MLflow artifacts
(`checkpoints/step_*`); a step found both ways is evaluated once (the storage copy wins).

The comparison table has one row per pretraining run and one column per `<task>/<metric>`, taken
from each run's newest evaluated checkpoint, like Table 1 of the AB paper.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline import console
from pipeline.checkpoints import CheckpointError, checkpoint_key, read_meta, weights_fingerprint
from pipeline.config import Config, ConfigError
from pipeline.eval.job import RANDOM_PREFIX, check_probe_names, eval_signature, evaluate_checkpoint, task_roots
from pipeline.eval.report import comparison_table, plot_sweep, write_comparison, write_records

log = logging.getLogger("abpipe.sweep")

_STEP = re.compile(r"(?:checkpoint|step)_(\d+)$")


@dataclass
class CheckpointRef:
    """One checkpoint to evaluate: how to load it, the key eval runs are tagged with, its table row."""

    ref: str  # a local dir or runs:/<run id>/<artifact dir>
    key: str  # "<pretraining run id>@<step>", or "path:<dir>" when nothing better is known
    row: str  # comparison-table row label (the pretraining run)
    step: int  # -1 when unknown


def _step(name: str) -> int | None:
    match = _STEP.search(name.rstrip("/"))
    return int(match.group(1)) if match else None


def _row_label(objective: str, run_name: str, run_id: str | None) -> str:
    return f"{objective}: {run_name}" + (f" ({run_id[:8]})" if run_id else "")


def run_checkpoints(client, run, latest_only: bool = False) -> list[CheckpointRef]:
    """A pretraining run's checkpoints: Ray Train storage dirs, then MLflow artifacts of other steps."""
    run_id = run.info.run_id
    tags, params = run.data.tags, run.data.params
    row = _row_label(
        tags.get("abpipe.objective", params.get("objective.name", "?")),
        run.info.run_name or params.get("train.run_name", ""),
        run_id,
    )
    storage = tags.get("abpipe.storage_path") or params.get("train.storage_path", "")
    name = params.get("train.run_name") or run.info.run_name or ""
    by_step: dict[int, CheckpointRef] = {}
    if storage and name:
        for path in _storage_checkpoints(storage, name):
            step = _step(path)
            if step is not None:
                by_step[step] = CheckpointRef(path, f"{run_id}@{step}", row, step)
    try:
        artifacts = client.list_artifacts(run_id, "checkpoints")
    except Exception as exc:  # an unreachable artifact store must not hide the local checkpoints
        log.warning("run %s: cannot list checkpoint artifacts: %s", run_id, exc)
        artifacts = []
    for art in artifacts:
        step = _step(art.path)
        if art.is_dir and step is not None and step not in by_step:
            by_step[step] = CheckpointRef(f"runs:/{run_id}/{art.path}", f"{run_id}@{step}", row, step)
    refs = [by_step[s] for s in sorted(by_step)]
    return refs[-1:] if latest_only else refs


def _storage_checkpoints(storage: str, name: str) -> list[str]:
    """`checkpoint_*` folders of a Ray Train run, local or on object storage (paths or URIs)."""
    if "://" not in storage:
        return [p for p in sorted(glob.glob(os.path.join(storage, name, "checkpoint_*"))) if os.path.isdir(p)]
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem, join

    try:
        fs, base = filesystem(storage)
        infos = fs.get_file_info(pafs.FileSelector(f"{base.rstrip('/')}/{name}", allow_not_found=True))
    except OSError as exc:  # unreachable storage must not hide the MLflow artifacts
        log.warning("cannot list %s/%s: %s", storage, name, exc)
        return []
    return sorted(
        join(storage, name, i.base_name)
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )


def dir_checkpoints(path: str, latest_only: bool = False) -> list[CheckpointRef]:
    """A checkpoint dir, or a Ray Train run dir of `checkpoint_*` dirs. Unreadable ones are kept
    (keyed by path) so that evaluating them records the error instead of dropping them."""
    if not os.path.isdir(path):
        return [CheckpointRef(path, f"path:{os.path.abspath(path)}", path, -1)]
    subdirs = sorted(d for d in glob.glob(os.path.join(path, "checkpoint_*")) if os.path.isdir(d))
    dirs = subdirs or [path]
    refs = []
    for d in dirs:
        step = _step(d)
        try:
            meta = read_meta(d)
            cfg = meta.get("config", {})
            run_id, step = meta.get("mlflow_run_id"), int(meta.get("step", -1 if step is None else step))
            row = _row_label(
                cfg.get("objective", {}).get("name", "?"),
                cfg.get("train", {}).get("run_name", os.path.basename(path)),
                run_id,
            )
            key = checkpoint_key(meta, None, weights_fingerprint(d))  # what `abpipe eval` of this dir tags
        except (CheckpointError, OSError, ValueError, TypeError, AttributeError):
            row, key = os.path.abspath(path), f"path:{os.path.abspath(d)}"
        refs.append(CheckpointRef(os.path.abspath(d), key, row, -1 if step is None else step))
    return refs[-1:] if latest_only else refs


def _pretraining_runs(client, cfg: Config) -> list:
    sc = cfg.sweep
    runs = []
    for run_id in sc.runs:
        try:
            runs.append(client.get_run(run_id))
        except Exception as exc:
            raise ConfigError(f"sweep.runs: no run {run_id} in {cfg.tracking.tracking_uri}: {exc}") from None
    for name in sc.experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"sweep.experiments: no experiment '{name}' in {cfg.tracking.tracking_uri}")
        runs += _search(client, [exp.experiment_id], "tags.`abpipe.kind` = 'pretrain'")
    return list({r.info.run_id: r for r in runs}.values())


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _finished_evals(client, experiment_ids: list[str]) -> dict[tuple[str, str, str], Any]:
    """(checkpoint key, task, signature) -> the newest FINISHED eval run."""
    done: dict[tuple[str, str, str], Any] = {}
    if not experiment_ids:
        return done
    for run in _search(client, experiment_ids, "tags.`abpipe.kind` = 'eval' and attributes.status = 'FINISHED'"):
        t = run.data.tags
        slot = (t.get("abpipe.checkpoint_key", ""), t.get("abpipe.task", ""), t.get("abpipe.eval_signature", ""))
        if slot not in done or run.info.start_time > done[slot].info.start_time:
            done[slot] = run
    return done


# -- claims: two sweeps running at once never evaluate the same pair ------------------------------

HEARTBEAT_TAG = "abpipe.claim_heartbeat"


class PairClaims:
    """Claim-then-check on the tracking server: a sweep opens a pair's eval run (its claim), then
    looks for any *other* FINISHED run or live claim of the same (checkpoint key, task, signature);
    if there is one, it withdraws its own run (KILLED, then deleted) and leaves the pair alone.

    Why this is safe: if two sweeps A and B both went ahead, each check ran after its own claim was
    stored, so the later of the two checks sees the earlier claim (the tracking server's database
    commits a run before answering) and withdraws. Two claims that see each other both withdraw:
    each then waits a random 0.5-2 s and, if the pair is still free, claims again (3 tries).
    It needs nothing but the tracking server every sweep already shares, whatever stores it.

    A claim is live while its run is RUNNING and its heartbeat (tag `abpipe.claim_heartbeat`, epoch s,
    refreshed by a thread every `ttl_s / 4`) is younger than `ttl_s`: a sweep that was killed frees its
    pairs `sweep.claim_ttl_s` later. Clocks of different machines only need to agree well within it.
    """

    def __init__(self, client, tracking_uri: str, experiment_ids: list[str], ttl_s: float):
        import threading

        self.client, self.uri, self.experiment_ids, self.ttl_s = client, tracking_uri, list(experiment_ids), ttl_s
        self.yielded: list[tuple[str, str, str]] = []  # (checkpoint key, task, why)
        self._mine: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="abpipe-claim-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                mine = list(self._mine)
            for run_id in mine:
                try:
                    self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
                except Exception as exc:  # a missed beat is retried; ttl covers a few
                    log.warning("claim heartbeat for run %s failed: %s", run_id, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def release_all(self) -> None:
        """The runs this sweep evaluated are closed: no more heartbeats for them."""
        with self._lock:
            self._mine.clear()

    def _others(
        self, experiment_ids: list[str], key: str, task: str, signature: str, mine: str | None = None
    ) -> tuple[list, list]:
        """(FINISHED runs, live claims) of the pair other than `mine`."""
        query = f"tags.`abpipe.kind` = 'eval' and tags.`abpipe.task` = '{task}'"
        if "'" not in key:
            query += f" and tags.`abpipe.checkpoint_key` = '{key}'"
        finished, live, now = [], [], time.time()
        for run in _search(self.client, experiment_ids, query):
            t = run.data.tags
            if (
                run.info.run_id == mine
                or t.get("abpipe.checkpoint_key") != key
                or t.get("abpipe.eval_signature") != signature
            ):
                continue
            if run.info.status == "FINISHED":
                finished.append(run)
            elif run.info.status == "RUNNING":
                beat = max(run.info.start_time / 1000, float(t.get(HEARTBEAT_TAG, 0) or 0))
                if now - beat < self.ttl_s:
                    live.append(run)
        return finished, live

    def taken(self, key: str, task: str, signature: str) -> str | None:
        """Why the pair is not free (done, or claimed by a live sweep), without claiming it."""
        finished, live = self._others(self.experiment_ids, key, task, signature)
        return self._why(finished, live)

    @staticmethod
    def _why(finished: list, live: list) -> str | None:
        if finished:
            return f"done by eval run {finished[0].info.run_id}"
        if live:
            return f"being evaluated by eval run {live[0].info.run_id}"
        return None

    def start(self, experiment: str, run_name: str, params: dict, tags: dict) -> str | None:
        """Open the pair's run if this sweep wins its claim (evaluate_checkpoint's `start`), else None."""
        import random

        from pipeline.tracking import start_run

        key, task, signature = tags["abpipe.checkpoint_key"], tags["abpipe.task"], tags["abpipe.eval_signature"]
        why = None
        for attempt in range(3):
            run_id = start_run(self.uri, experiment, run_name, params, {**tags, HEARTBEAT_TAG: f"{time.time():.0f}"})
            scope = sorted(set(self.experiment_ids) | {self.client.get_run(run_id).info.experiment_id})
            finished, live = self._others(scope, key, task, signature, mine=run_id)
            if not finished and not live:
                with self._lock:
                    self._mine.add(run_id)
                return run_id
            self._withdraw(run_id)
            why = self._why(finished, [])
            if why:
                break
            time.sleep(random.uniform(0.5, 2.0))
            why = self._why(*self._others(scope, key, task, signature))
            if why:
                break
        why = why or "contended by another sweep three times: left for the next sweep"
        self.yielded.append((key, task, why))
        console.note(f"sweep: {key} x {task} skipped: {why}")
        return None

    def _withdraw(self, run_id: str) -> None:
        self.client.set_tag(run_id, "abpipe.claim", "withdrawn")
        self.client.set_terminated(run_id, "KILLED")
        self.client.delete_run(run_id)


def _probe_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The probe results among an eval run's metrics (bookkeeping such as n_train left out)."""
    from pipeline.eval.probes import PROBES

    def is_probe(name: str) -> bool:  # "<probe>_<metric>": box_linear_top1 is box_linear's, not a "box" probe's
        return any(name.startswith(f"{probe}_") for probe in PROBES)

    return {k: v for k, v in metrics.items() if is_probe(k.removeprefix(RANDOM_PREFIX))}


def _experiment_ids(client, cfg: Config, runs: list) -> list[str]:
    ids = {r.info.experiment_id for r in runs}
    own = client.get_experiment_by_name(cfg.tracking.experiment)
    if own is not None:
        ids.add(own.experiment_id)
    return sorted(ids)


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Evaluate every not-yet-done (checkpoint, task) pair; write + log the comparison table."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunLogger, start_run

    cfg = cfg.resolved()
    sc, ev = cfg.sweep, cfg.eval
    if not (sc.runs or sc.experiments or sc.checkpoints):
        raise ConfigError(
            "sweep: give sweep.runs (pretraining run ids), sweep.experiments and/or sweep.checkpoints (dirs)"
        )
    tasks = task_roots(ev)
    check_probe_names(ev)
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    runs = _pretraining_runs(client, cfg)
    refs: list[CheckpointRef] = []
    failures: list[dict[str, str]] = []
    for run in runs:
        found = run_checkpoints(client, run, sc.latest_only)
        if not found:  # a missing checkpoint is a recorded failure, never a silently empty row
            storage = run.data.tags.get("abpipe.storage_path") or run.data.params.get("train.storage_path", "?")
            where = f"{storage}/{run.data.params.get('train.run_name') or run.info.run_name}/checkpoint_*"
            ref = CheckpointRef(run.info.run_id, f"{run.info.run_id}@?", run.info.run_name or run.info.run_id, -1)
            failures.append(
                _failure(
                    ref, "*", f"run {run.info.run_id}: no checkpoint in {where} nor MLflow artifacts checkpoints/step_*"
                )
            )
        refs += found
    for path in sc.checkpoints:
        refs += dir_checkpoints(path, sc.latest_only)
    refs = list({r.key: r for r in refs}.values())  # the same checkpoint named twice is evaluated once
    signatures = {t: eval_signature(ev, t, root) for t, root in tasks.items()}
    experiments = _experiment_ids(client, cfg, runs)
    done = _finished_evals(client, experiments)

    started = time.perf_counter()
    sweep_run = start_run(
        uri,
        cfg.tracking.experiment,
        "sweep",
        {k: v for k, v in cfg.flat().items() if k.startswith(("sweep.", "eval."))},
        {"abpipe.kind": "sweep"},
    )
    logger = RunLogger(uri, sweep_run)
    evaluated, skipped = [], []
    claims = PairClaims(client, uri, _experiment_ids(client, cfg, runs), sc.claim_ttl_s)
    bar = console.progress("sweep", total=len(refs) * len(tasks), unit="pair")
    try:
        for ref in refs:
            pending = {t: root for t, root in tasks.items() if (ref.key, t, signatures[t]) not in done}
            skipped += [(ref.key, t) for t in tasks if t not in pending]
            for t in list(pending):  # done or being done by another sweep since this one started
                why = claims.taken(ref.key, t, signatures[t])
                if why:
                    claims.yielded.append((ref.key, t, why))
                    del pending[t]
            bar.update(len(tasks) - len(pending), done=len(evaluated), skipped=len(skipped), failed=len(failures))
            if not pending:
                continue
            console.note(f"sweep: {ref.ref} (step {ref.step}) x {', '.join(pending)}")
            try:
                result = evaluate_checkpoint(cfg, ref.ref, pending, key=ref.key, start=claims.start)
            except (CheckpointError, OSError) as exc:
                failures += [_failure(ref, t, f"{type(exc).__name__}: {exc}") for t in pending]
            else:
                evaluated += [(ref.key, t) for t in result["tasks"]]
                failures += [_failure(ref, t, msg) for t, msg in result["failures"].items()]
            finally:
                claims.release_all()
            bar.update(len(pending), done=len(evaluated), skipped=len(skipped), failed=len(failures))
        bar.close()
        experiments = _experiment_ids(client, cfg, runs)  # the first eval may have created cfg's experiment
        done = _finished_evals(client, experiments)
        records = []
        for ref in refs:
            for task in tasks:
                run = done.get((ref.key, task, signatures[task]))
                if run is not None:
                    records.append(
                        {
                            "row": ref.row,
                            "step": ref.step,
                            "task": task,
                            "checkpoint": ref.ref,
                            "eval_run_id": run.info.run_id,
                            "metrics": _probe_metrics(run.data.metrics),
                        }
                    )
        header, rows = comparison_table(records)
        out_dir = os.path.join(
            sc.output or cfg.paths.under("sweeps"), time.strftime("%Y%m%d-%H%M%S") + f"-{sweep_run[:8]}"
        )
        paths = write_comparison(
            out_dir, header, rows, f"abpipe sweep {sweep_run}: {len(refs)} checkpoints x {len(tasks)} tasks"
        )
        if failures:
            with open(paths[0], "a") as fh:
                items = [
                    f"- `{f['checkpoint']}` x `{f['task']}`: " + f["error"].replace("\n", "\n  ") for f in failures
                ]
                fh.write("\n## Failed pairs\n\n" + "\n".join(items) + "\n")
        long = [
            {**{k: r[k] for k in ("row", "step", "task", "checkpoint", "eval_run_id")}, "metric": m, "value": v}
            for r in records
            for m, v in sorted(r["metrics"].items())
        ]
        paths.append(
            write_records(
                os.path.join(out_dir, "all_checkpoints.csv"),
                long,
                ["row", "step", "task", "metric", "value", "checkpoint", "eval_run_id"],
            )
        )
        paths.append(
            write_records(
                os.path.join(out_dir, "failures.csv"), failures, ["checkpoint", "key", "row", "task", "error"]
            )
        )
        plot = plot_sweep(os.path.join(out_dir, "metrics_vs_step.png"), records)
        paths += [plot] if plot else []
        for path in paths:
            logger.artifact(path)
        total = len(refs) * len(tasks)
        claimed = [(k, t) for k, t, _ in claims.yielded]
        logger.metrics(
            {
                "pairs": total,
                "evaluated": len(evaluated),
                "skipped": len(skipped),
                "claimed_elsewhere": len(claimed),
                "failed": len(failures),
                "wall_s": time.perf_counter() - started,
            },
            step=0,
        )
    except BaseException:
        bar.close()
        logger.finish("FAILED")
        raise
    finally:
        claims.close()
    logger.finish()
    return {
        "run_id": sweep_run,
        "pairs": total,
        "evaluated": evaluated,
        "skipped": skipped,
        "claimed_elsewhere": claimed,
        "failures": failures,
        "table": {"header": header, "rows": rows},
        "records": records,  # every evaluated (checkpoint, task): row, step, task, checkpoint, eval_run_id, metrics
        "output": out_dir,
    }


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list]]:
    """The sweep's comparison table (a row per pretraining run, its newest evaluated checkpoint)."""
    return list(result["table"]["header"]), [list(r) for r in result["table"]["rows"]]


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"sweep: {result['pairs']} pairs: {len(result['evaluated'])} evaluated, {len(result['skipped'])} already done, "
        f"{len(result['failures'])} failed, {len(result.get('claimed_elsewhere', []))} done or being done by "
        f"another sweep; tables and failures in {result['output']}"
    )


def _failure(ref: CheckpointRef, task: str, message: str) -> dict[str, str]:
    log.warning("sweep: %s x %s failed: %s", ref.ref, task, message)
    return {"checkpoint": ref.ref, "key": ref.key, "row": ref.row, "task": task, "error": message}


__all__ = ["CheckpointRef", "PairClaims", "dir_checkpoints", "run_checkpoints", "run_sweep"]
