"""Shared test set-up: one real local Ray cluster per session, a clean HOME, offline libraries."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pipeline.runtime import LOCAL_ONLY_ENV, QUIET_ENV  # Ray-free: importing it sets nothing

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="abpipe-tests-"))

# Set before anything imports Ray/MLflow: the quiet environment every abpipe process gets (one list, in
# pipeline/runtime.py), Ray kept on 127.0.0.1, and any file a library drops in HOME (Ray's auth token,
# caches) inside the test session's temp dir.
os.environ.update(
    {
        **QUIET_ENV,
        **LOCAL_ONLY_ENV,
        "HOME": str(_SESSION_TMP / "home"),
        "ABPIPE_RAY_TMP": str(_SESSION_TMP / "ray"),
        "TORCH_HOME": str(_SESSION_TMP / "torch"),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the fast tier, docs/development.md): one torch thread per test process, so two
    # processes share two cores instead of four threads fighting over them
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own sqlite stores
(_SESSION_TMP / "home").mkdir(exist_ok=True)
# Object-storage credentials and endpoint as an operator exports them, before Ray starts so that
# every worker inherits them; the S3 server behind them starts on first use (fixture s3_server).
from tests.servers import S3_ENV  # noqa: E402

for _key in [k for k in os.environ if k.startswith("AWS_")]:
    del os.environ[_key]  # a developer's real AWS settings never reach a test
os.environ.update(S3_ENV)


# The fast tier is `pytest -m "not ray"`. Every test that starts Ray (through the shared cluster fixture,
# directly or via a fixture built on it) is marked here; tests that start Ray or other slow machinery
# another way (their own cluster, notebooks, subprocess workers) carry `pytest.mark.ray` explicitly.
RAY_FIXTURES = {"ray_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance with 2 CPUs, shared by every test that needs Ray."""
    from pipeline.config import RayConfig
    from pipeline.runtime import init_ray

    ray = init_ray(RayConfig(num_cpus=2, temp_dir=str(_SESSION_TMP / "ray")))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session", autouse=True)
def _fresh_mlflow_stores_from_a_template():
    """Every new sqlite MLflow store in this process starts as a copy of one built once (tests/mlflow_template.py)."""
    from tests.mlflow_template import build_fresh_stores_from

    build_fresh_stores_from(_SESSION_TMP / "mlflow-template.db")


@pytest.fixture(scope="session")
def digits_folder(session_tmp) -> Path:
    """sklearn's real digits as a labelled image folder (30 per class, 32 px PNG)."""
    from pipeline.data.sample_data import write_digits_folder

    return write_digits_folder(session_tmp / "digits", size=32, per_class=30)


@pytest.fixture(scope="session")
def photo_files(session_tmp) -> list[Path]:
    """scikit-image's shipped photographs as real JPEG files."""
    from pipeline.data.sample_data import write_photo_files

    return write_photo_files(session_tmp / "photos", copies=2, max_side=384)


@pytest.fixture(scope="session")
def digit_shards(ray_cluster, digits_folder, session_tmp):
    from pipeline.config import Config, IngestConfig, PathsConfig
    from pipeline.ingest import run_ingest

    out = session_tmp / "train_shards"
    cfg = Config(
        paths=PathsConfig(root=str(session_tmp / "ingest_root")),
        ingest=IngestConfig(input=str(digits_folder), output=str(out), samples_per_shard=100),
    )
    stats = run_ingest(cfg)
    assert stats["counts"]["ok"] == 300
    return out


# ---------------------------------------------------------------- production-path servers


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 (IAM auth on), bucket tests.servers.BUCKET; S3_ENV points at it."""
    from tests.servers import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster from the system's binaries (`apt-get install postgresql`; .ci/run does)."""
    from tests.servers import PostgresServer, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: their absence is a broken set-up, not a skip
        pytest.skip(message)
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, session_tmp):
    """`mlflow server` on the PostgreSQL store, artifacts proxied to s3://<bucket>/mlartifacts."""
    from tests.servers import BUCKET, MlflowServer

    server = MlflowServer(postgres.uri, f"s3://{BUCKET}/mlartifacts", str(session_tmp / "mlflow-server.log")).start()
    yield server
    server.stop()
