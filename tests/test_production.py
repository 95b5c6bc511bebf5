"""The production path, end to end on 127.0.0.1: an MLflow tracking server on PostgreSQL with its
artifacts proxied to S3-compatible storage (moto, IAM auth on), shards and Ray Train checkpoints on
that storage, credentials only in the environment.

One module-scoped run does the expensive part once: `abpipe ingest --out s3://…`, pretraining with 2
workers on `storage_path: s3://…` during which a worker is killed (Ray Train restarts from the S3
checkpoint), then a resubmission with a larger budget. The tests read the outcome back through the
MLflow client and the object store, and go on from it: eval from an S3 checkpoint and from an MLflow
artifact, two sweeps at once beside a training run, a tracking-server outage, a credential scan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.checkpoints import read_meta
from pipeline.config import EvalConfig, TrackingConfig
from tests.servers import BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY
from tests.test_resume import kill_a_train_worker_when
from tests.test_train import BATCH, A, M, metric_steps, micro_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "production"
SHARDS = f"s3://{BUCKET}/prod/shards/digits"
STORAGE = f"s3://{BUCKET}/prod/ray_results"
STEPS, MORE_STEPS, WORKERS = 8, 10, 2
TRAIN_KEYS = ("loss", "loss_annotation", "loss_propagation", "lr", "ema_rate", "views_seen", "grad_norm_l2")


def _server_config(
    root, uri: str, steps: int, run_name: str = "prod", workers: int = WORKERS, storage: str = STORAGE, **train
):
    cfg = micro_config(
        root, SHARDS, steps=steps, num_workers=workers, checkpoint_every_steps=4, run_name=run_name, **train
    )
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, storage_path=storage),
        tracking=TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT),
    )


@pytest.fixture(scope="module")
def prod_run(ray_cluster, mlflow_server, s3_server, digits_folder, tmp_path_factory):
    """Ingest to S3, pretrain on 2 workers with a worker killed mid-run, resubmit with a larger budget."""
    from pipeline.cli import main
    from pipeline.train.trainer import run_pretrain

    root = tmp_path_factory.mktemp("prod")
    uri = mlflow_server.uri
    argv = [
        "ingest",
        "image_folder",
        "--input",
        str(digits_folder),
        "--out",
        SHARDS,
        f"paths.root={root}",
        "ingest.samples_per_shard=100",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
    ]
    assert main(argv) == 0

    cfg = _server_config(root, uri, STEPS, max_failures=1)
    killed: list[int] = []

    def first_checkpoint_on_s3() -> bool:
        return any(k.endswith("checkpoint_00000004/state.pt") for k in s3_server.keys("prod/ray_results/prod/"))

    killer = kill_a_train_worker_when(first_checkpoint_on_s3, killed, poll_s=0.2)
    first = run_pretrain(cfg)
    killer.join(timeout=5)
    second = run_pretrain(_server_config(root, uri, MORE_STEPS, max_failures=1))
    return {"root": root, "uri": uri, "cfg": cfg, "first": first, "second": second, "killed": killed}


def test_ingest_and_two_worker_pretraining_check_out_through_the_mlflow_client(prod_run, s3_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(prod_run["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server's proxy"
    (ingest,) = client.search_runs([exp.experiment_id], "tags.`abpipe.kind` = 'ingest'")
    assert ingest.data.metrics["count_ok"] == 300 and ingest.data.tags["abpipe.output"] == SHARDS

    first, second = prod_run["first"], prod_run["second"]
    assert prod_run["killed"], "no training worker was killed: the test did not exercise a restart from S3"
    assert second["run_id"] == first["run_id"], "the resubmitted job on s3:// storage resumes into the same MLflow run"
    assert first["checkpoint"] == f"{STORAGE}/prod/checkpoint_{STEPS:08d}"
    assert second["checkpoint"] == f"{STORAGE}/prod/checkpoint_{MORE_STEPS:08d}"
    (run,) = client.search_runs([exp.experiment_id], "tags.`abpipe.kind` = 'pretrain' and attributes.run_name = 'prod'")
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == str(WORKERS) and run.data.params["data.shards"] == SHARDS
    assert (
        run.data.params["train.storage_path"] == STORAGE
        and run.data.tags["abpipe.checkpoint_path"] == second["checkpoint"]
    )
    for key in TRAIN_KEYS:  # every step once: none lost to the kill, none repeated by the replay after it
        assert metric_steps(client, run.info.run_id, key) == list(range(1, MORE_STEPS + 1)), key
    views = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "views_seen")}
    assert views[MORE_STEPS] == MORE_STEPS * BATCH * (M + A) * WORKERS

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {f"checkpoints/step_{s:08d}" for s in (4, 8, 10)} <= artifacts
    keys = s3_server.keys("mlartifacts/")
    stored = f"mlartifacts/{exp.experiment_id}/{run.info.run_id}/artifacts/checkpoints/step_{MORE_STEPS:08d}/state.pt"
    assert stored in keys, "checkpoint artifacts land on the object store behind the server"
    ray_keys = s3_server.keys("prod/ray_results/prod/")
    assert f"prod/ray_results/prod/checkpoint_{MORE_STEPS:08d}/state.pt" in ray_keys
    meta = json.loads(
        s3_server.client()
        .get_object(Bucket=BUCKET, Key=f"prod/ray_results/prod/checkpoint_{MORE_STEPS:08d}/meta.json")["Body"]
        .read()
    )
    assert meta["step"] == MORE_STEPS and meta["mlflow_run_id"] == run.info.run_id and meta["world_size"] == WORKERS


def _eval_config(prod_run, digits_folder):
    ev = EvalConfig(
        tasks=["folder"],
        task_roots={"folder": str(digits_folder)},
        probes=["knn"],
        max_per_split=40,
        batch_size=64,
        random_init=False,
    )
    return dataclasses.replace(prod_run["cfg"], eval=ev)


def test_eval_from_an_s3_checkpoint_and_from_an_mlflow_artifact_on_s3(prod_run, digits_folder):
    from mlflow.tracking import MlflowClient

    from pipeline.eval.job import evaluate_checkpoint

    cfg, run_id = _eval_config(prod_run, digits_folder), prod_run["first"]["run_id"]
    client = MlflowClient(prod_run["uri"])
    from_storage = evaluate_checkpoint(cfg, prod_run["second"]["checkpoint"])
    from_artifact = evaluate_checkpoint(cfg, f"runs:/{run_id}/checkpoints/step_{STEPS:08d}")
    assert (from_storage["checkpoint_key"], from_artifact["checkpoint_key"]) == (
        f"{run_id}@{MORE_STEPS}",
        f"{run_id}@{STEPS}",
    )
    for result, path in (
        (from_storage, prod_run["second"]["checkpoint"]),
        (from_artifact, f"runs:/{run_id}/checkpoints/step_{STEPS:08d}"),
    ):
        eval_run = client.get_run(result["tasks"]["folder"]["run_id"])
        assert (
            eval_run.info.status == "FINISHED" and eval_run.data.tags["mlflow.parentRunId"] == run_id
        )  # nested under pretraining
        assert eval_run.data.tags["abpipe.checkpoint_path"] == path and 0 <= eval_run.data.metrics["knn_top1"] <= 1
        assert {a.path for a in client.list_artifacts(eval_run.info.run_id)} >= {"results.md", "results.png"}


def _sweep_process(prod_run, digits_folder, ray_address: str, out: Path) -> subprocess.Popen:
    roots = json.dumps({"folder": str(digits_folder)})
    argv = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "sweep",
        "--json",  # the result as one JSON document (read below), the tables on stderr
        "--runs",
        prod_run["first"]["run_id"],
        "--tasks",
        "folder",
        f"eval.task_roots={roots}",
        "eval.probes=[knn]",
        "eval.max_per_split=40",
        "eval.batch_size=64",
        "eval.random_init=false",
        "eval.knn_k=5",  # another eval signature than the single evals above: every pair is still to do
        f"tracking.tracking_uri={prod_run['uri']}",
        f"tracking.experiment={EXPERIMENT}",
        f"paths.root={prod_run['root']}",
        f"ray.address={ray_address}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, stdout=out.open("w"), stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


@pytest.mark.timeout(900)
def test_two_sweeps_at_once_evaluate_each_pair_once_beside_a_training_run(
    prod_run, ray_cluster, digits_folder, tmp_path
):
    from mlflow.tracking import MlflowClient

    from pipeline.train.trainer import run_pretrain

    client = MlflowClient(prod_run["uri"])
    address = ray_cluster.get_runtime_context().gcs_address
    sweeps = [_sweep_process(prod_run, digits_folder, address, tmp_path / f"sweep{i}.log") for i in range(2)]
    steps = 6
    # in the driver (train.num_workers=0): this test is about the sweeps and concurrent logging, not Ray Train
    training = run_pretrain(
        _server_config(prod_run["root"], prod_run["uri"], steps, run_name="beside-sweeps", workers=0)
    )
    for proc in sweeps:
        proc.wait(timeout=600)
    logs = [(tmp_path / f"sweep{i}.log").read_text() for i in range(2)]
    results = [json.JSONDecoder().raw_decode(log, log.rindex("\n{\n") + 1)[0] for log in logs]  # the CLI's JSON summary
    assert all(p.returncode == 0 for p in sweeps), [log[-3000:] for log in logs]

    run_id = prod_run["first"]["run_id"]
    pairs = {
        (f"{run_id}@{s}", "folder") for s in (4, 8, 10)
    }  # step 4 lives only as an MLflow artifact (keep_checkpoints=2)
    evaluated = [tuple(p) for r in results for p in r["evaluated"]]
    assert len(evaluated) == len(set(evaluated)) and set(evaluated) == pairs, results
    assert all(not r["failures"] for r in results), results
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    signature = None
    for key, task in pairs:
        runs = client.search_runs(
            [exp],
            f"tags.`abpipe.kind` = 'eval' and tags.`abpipe.checkpoint_key` = '{key}' "
            "and attributes.status = 'FINISHED'",
        )
        swept = [r for r in runs if r.data.params.get("eval.knn_k") == "5"]
        assert len(swept) == 1, f"{key} x {task} evaluated {len(swept)} times"
        signature = signature or swept[0].data.tags["abpipe.eval_signature"]
        assert (
            swept[0].data.metrics["knn_top1"] >= 0
            and len(client.get_metric_history(swept[0].info.run_id, "knn_top1")) == 1
        )

    # concurrent logging lost nothing: every training step of every key, once
    for key in TRAIN_KEYS:
        assert metric_steps(client, training["run_id"], key) == list(range(1, steps + 1)), key
    train_run = client.get_run(training["run_id"])
    sweep_runs = [client.get_run(r["run_id"]) for r in results]
    overlap = [
        s
        for s in sweep_runs
        if s.info.start_time < train_run.info.end_time and train_run.info.start_time < s.info.end_time
    ]
    assert overlap, "the sweeps and the training run did not log at the same time"
    for sweep in sweep_runs:
        assert sweep.data.metrics["pairs"] == 3 and len(client.get_metric_history(sweep.info.run_id, "pairs")) == 1


@pytest.mark.timeout(900)
def test_tracking_server_outage_mid_training_costs_warnings_not_the_run_nor_metrics(prod_run, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.train.trainer import run_pretrain

    steps = 30
    # in the driver (train.num_workers=0): the logger that rides out the outage is rank 0's RunLogger, the
    # same class in a Ray Train worker (the kill-and-restart runs above go through Ray Train)
    cfg = _server_config(
        prod_run["root"],
        prod_run["uri"],
        steps,
        run_name="outage",
        workers=0,
        storage=str(prod_run["root"] / "ray_results"),
    )
    client = MlflowClient(prod_run["uri"])
    events: dict[str, float] = {}

    def outage():
        """Once a few steps are logged, the server dies (SIGKILL), stays away 5 s, and comes back."""
        deadline = time.time() + 400
        while time.time() < deadline:
            runs = client.search_runs(
                [client.get_experiment_by_name(EXPERIMENT).experiment_id], "attributes.run_name = 'outage'"
            )
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
                break
            time.sleep(0.3)
        mlflow_server.stop()
        events["down"] = time.time()
        time.sleep(5)
        mlflow_server.start()
        events["up"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = run_pretrain(cfg)
    thread.join(timeout=400)
    assert "down" in events and "up" in events, "the outage never happened"
    assert read_meta(result["checkpoint"])["step"] == steps
    out = capsys.readouterr().out
    failed, unlogged = int(result["metrics"]["mlflow_failed_calls"]), int(result["metrics"]["mlflow_unlogged_points"])
    assert failed >= 1, "the training run's logger never saw the outage"
    assert "tracking server was away during training" in out and f"{unlogged} metric points" in out
    history = metric_steps(client, result["run_id"], "loss")
    # every point logged before, during and after the outage is there, or the gap is counted and reported
    assert len(history) == len(set(history)) and set(history) <= set(range(1, steps + 1))
    assert history == list(range(1, steps + 1)) if unlogged == 0 else steps - len(history) <= unlogged
    assert client.get_run(result["run_id"]).data.metrics["mlflow_failed_calls"] == failed


def test_no_credential_value_in_mlflow_params_logs_or_checkpoints(prod_run, s3_server, mlflow_server, session_tmp):
    from mlflow.tracking import MlflowClient

    secrets_ = [S3_SECRET_KEY.encode(), S3_ACCESS_KEY.encode()]
    client = MlflowClient(prod_run["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "")
    kinds = {r.data.tags.get("abpipe.kind") for r in runs}  # eval and sweep runs too when their tests ran first
    assert {"ingest", "pretrain"} <= kinds, kinds
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]).encode()
        assert not any(s in text for s in secrets_), f"run {run.info.run_name} holds a credential"
    leaks = []
    for key in s3_server.keys(""):  # shards, Ray Train checkpoints, MLflow artifacts: every object
        body = s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        leaks += [key for s in secrets_ if s in body]
    logs = [
        p for p in Path(session_tmp, "ray").rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt")
    ]
    logs += list(Path(prod_run["root"]).rglob("*"))
    for path in logs:
        if path.is_file():
            data = path.read_bytes()
            leaks += [str(path) for s in secrets_ if s in data]
    assert len(logs) > 10 and leaks == [], leaks


def test_a_pair_claim_yields_to_a_finished_run_or_a_live_claim_and_takes_a_stale_one(mlflow_server):
    """The claim protocol alone, against the PostgreSQL-backed server: no Ray, no model."""
    from mlflow.tracking import MlflowClient

    from pipeline.eval.sweep import HEARTBEAT_TAG, PairClaims
    from pipeline.tracking import ensure_experiment

    uri, client = mlflow_server.uri, MlflowClient(mlflow_server.uri)
    exp = ensure_experiment(uri, "claims")
    claims = PairClaims(client, uri, [exp], ttl_s=60)

    def tags(key):
        return {
            "abpipe.kind": "eval",
            "abpipe.checkpoint_key": key,
            "abpipe.task": "folder",
            "abpipe.eval_signature": "sig",
        }

    try:
        won = claims.start("claims", "eval/folder", {}, tags("run@1"))
        assert won and claims.taken("run@1", "folder", "sig") == f"being evaluated by eval run {won}"
        assert claims.start("claims", "eval/folder", {}, tags("run@1")) is None, (
            "a second claim on a live pair must yield"
        )
        client.set_terminated(won, "FINISHED")
        assert claims.start("claims", "eval/folder", {}, tags("run@1")) is None, "a finished pair is never redone"
        # a claim whose sweep died (RUNNING, heartbeat older than the ttl) is taken over
        old = time.time() - 3600
        stale = client.create_run(
            exp, start_time=int(old * 1000), tags={**tags("run@2"), HEARTBEAT_TAG: f"{old:.0f}"}
        ).info.run_id
        assert claims.start("claims", "eval/folder", {}, tags("run@2")) not in (None, stale)
        # withdrawn claims leave no active run behind: exactly one FINISHED/RUNNING run per pair
        active = client.search_runs([exp], "tags.`abpipe.checkpoint_key` = 'run@1'")
        assert [r.info.run_id for r in active] == [won]
        assert [key for key, _, _ in claims.yielded] == ["run@1", "run@1"]
    finally:
        claims.close()
