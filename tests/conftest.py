"""Shared test set-up: one real local Ray cluster per session, a clean HOME, offline libraries."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
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

# The fast tier's longest tests (5-9 s each on an idle 2-core host; benchmarks/results/test_durations_*.txt),
# run first under `pytest -n 2`: xdist hands each worker a block of consecutive tests and then more as it
# finishes, so a long test left near the end keeps one worker busy while the other has run out. First, the
# tail is short tests and both workers end together. A module's tests that share a module fixture stay
# together (test_export's text towers): xdist's first block gives them to one worker, built once.
# tests/test_docs.py checks that every entry still names a test.
LONGEST_FIRST = (
    "tests/test_export.py::test_text_tower_export_scores_zero_shot_without_abpipe_as_abpipes_towers",
    "tests/test_probes.py::test_decoder_geometry_lets_a_box_find_its_patch_in_a_short_budget",
    "tests/test_precision.py::test_compile_traces_the_blocks_and_matches_eager",
    "tests/test_probes.py::test_decoder_detection_reaches_high_map_only_from_the_right_tokens",
    "tests/test_probes.py::test_decoder_box_classification_reads_the_queried_cell",
)


def _longest_first_rank(item) -> int:
    base = item.nodeid.split("[", 1)[0]
    return LONGEST_FIRST.index(base) if base in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike (xdist checks the collections match)
        items.sort(key=_longest_first_rank)  # stable: the rest keep pytest's order


# What the shared fixtures cost: `--durations` charges a module or session fixture's set-up to whichever
# test first needs it, so the summary lists them on their own (the set-up of each alone: the fixtures it
# uses are set up before it, and timed on their own lines). A plugin, not conftest hooks: a conftest's
# hooks do not see session-scoped fixtures. One process only: xdist workers' are not shown.
class _FixtureSetupTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        start = time.perf_counter()
        yield
        if fixturedef.scope != "function":
            key = f"{fixturedef.scope:<8} {fixturedef.argname}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def pytest_terminal_summary(self, terminalreporter):
        slow = sorted(((s, k) for k, s in self.seconds.items() if s >= 1.0), reverse=True)
        if slow:
            terminalreporter.write_sep("=", "shared fixtures' set-up over 1 s (each alone, summed over its instances)")
            for seconds, key in slow:
                terminalreporter.write_line(f"{seconds:8.2f}s {key}")


def pytest_configure(config):
    config.pluginmanager.register(_FixtureSetupTimes(), "abpipe-fixture-setup-times")


def pytest_sessionfinish(session, exitstatus):
    """This process's session temp dir (Ray's session logs, HOME, shards, stores; about 25 MB) goes when
    every test passed; after a failure, or with ABPIPE_KEEP_TEST_TMP=1, it stays and its path is printed.
    The shared cluster's fixture has shut Ray down by now: session fixtures tear down before this hook."""
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) and not os.environ.get(
        "ABPIPE_KEEP_TEST_TMP"
    ):
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)
    elif not os.environ.get("PYTEST_XDIST_WORKER"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            xdist = session.config.getoption("numprocesses", None)
            workers = " (and one per xdist worker, /tmp/abpipe-tests-*)" if xdist else ""
            reporter.write_line(f"the test session's temp dir, kept (Ray's logs under ray/): {_SESSION_TMP}{workers}")


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
