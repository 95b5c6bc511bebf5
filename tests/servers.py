"""Real servers for the production-path tests, each on 127.0.0.1: S3-compatible object storage
(moto's server), PostgreSQL (the Debian package's binaries) and an MLflow tracking server on them.

The S3 credentials and endpoint are fixed when this module is imported (conftest puts them in the
environment before Ray starts), the way an operator exports them before starting a job: every Ray
worker inherits them and nothing passes them around. The servers themselves start only when a test
asks for them (fixtures in conftest.py) and stop at the end of the session.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUCKET = "abpipe-test"
S3_PORT = free_port()
S3_ACCESS_KEY = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
S3_SECRET_KEY = secrets.token_urlsafe(30)  # random per session: a leak check can look for it verbatim
S3_ENV = {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups from a test machine
    # MLflow clients download artifacts from an S3-backed server through presigned URLs unless told to
    # stream them through the server; moto checks IAM signatures only in the Authorization header and
    # refuses presigned GETs, so the tests stream (docs/operations.md, "Downloads").
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
}


class S3Server:
    """moto's S3 in server mode, in a thread of the test process, on S3_PORT.

    IAM authentication is on: requests signed with anything but S3_ENV's key pair are refused as
    by AWS (InvalidAccessKeyId / SignatureDoesNotMatch). Its state lives in this process, so `stop()`
    then `start()` takes the endpoint away and brings the same buckets back.
    """

    def __init__(self, port: int = S3_PORT):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._server = None
        self._configured = False

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        if not self._configured:
            self._configure()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
        )

    def _configure(self) -> None:
        """The test bucket, an IAM user allowed s3:* whose key pair is S3_ENV's, then auth on."""
        import boto3
        from moto import settings
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.core.authorization import ActionAuthenticatorMixin
        from moto.iam.models import iam_backends

        kwargs = dict(
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        boto3.client("s3", **kwargs).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **kwargs)
        iam.create_user(UserName="abpipe")
        policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
        iam.put_user_policy(UserName="abpipe", PolicyName="s3-all", PolicyDocument=policy)
        iam.create_access_key(UserName="abpipe")
        key = iam_backends[DEFAULT_ACCOUNT_ID]["global"].users["abpipe"].access_keys[0]
        key.access_key_id, key.secret_access_key = (
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
        )  # moto's keys are random; ours are known to Ray
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        self._configured = True

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the test bucket."""
        out, token = [], None
        client = self.client()
        while True:
            page = client.list_objects_v2(
                Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {})
            )
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return out


# ---------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> str | None:
    """Where initdb/pg_ctl live: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return os.path.dirname(candidates[-1]) if candidates else None


class PostgresServer:
    """A throw-away PostgreSQL cluster: initdb in a temp dir, pg_ctl on a free loopback port.

    PostgreSQL refuses to run as root, so under root (CI containers) the binaries run as the
    `postgres` user the Debian package creates (else `nobody`) via runuser. Trust auth on
    127.0.0.1 and fsync off: a test database, not a production set-up (docs/operations.md).
    """

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.port = free_port()
        self.user = "abpipe"
        self.database = "mlflow"
        self.dir = tempfile.mkdtemp(prefix="abpipe-pg-")
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = next(u for u in ("postgres", "nobody") if _user_exists(u))
            shutil.chown(self.dir, user=self.run_as)
            os.chmod(self.dir, 0o700)

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", data, "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", data, "-l", os.path.join(self.dir, "server.log"), "-o", opts, "-w", "-t", "120", "start"
        )
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database)
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------- MLflow tracking server


class MlflowServer:
    """`mlflow server` on a PostgreSQL backend store, artifacts proxied to object storage.

    One uvicorn process (`--workers 1`) and no job-execution runner: on 2 busy cores, uvicorn's
    multi-worker supervisor kills workers that import too slowly. `stop()` takes the whole process
    group down (the CLI, uvicorn), `start()` brings it back on the same port and store.
    """

    def __init__(self, backend_uri: str, artifacts_destination: str, log_path: str):
        self.backend_uri = backend_uri
        self.artifacts_destination = artifacts_destination
        self.log_path = log_path
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> MlflowServer:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self._proc.returncode}): {self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # a server that goes away, as a crashed pod does
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=30)
        self._proc = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""
