"""The console a person sees: bars on a terminal, plain lines off it, `--json`, one line per bad input.

The CLI runs as a real subprocess (under a real pseudo-terminal where a TTY is the point); the Ray
ones join the session's Ray cluster instead of starting their own.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]
BAR = "%|"  # tqdm's bar: "train:  50%|█████     | 3/6 [...]"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_plain(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The CLI with stdout and stderr as pipes (CI, `ray job logs`)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=REPO)


def run_tty(args: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
    """The CLI on a real pseudo-terminal (120 columns): (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=slave, env=_env(**env), cwd=REPO)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


# ------------------------------------------------------------------- the console module on its own


def _drain(master: int, until: str, timeout: float = 10.0) -> str:
    """What the terminal shows, read until `until` appears: a pty hands the slave's writes to the master
    side asynchronously, so on a busy host one read can return only the first part."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and until not in "".join(chunks):
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            chunks.append(os.read(master, 65536).decode(errors="replace"))
    return "".join(chunks)


def test_progress_draws_a_bar_on_a_tty_and_plain_lines_off_it(monkeypatch):
    from pipeline import console

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        with console.progress("work", total=4, unit="img") as bar:
            for _ in range(4):
                bar.update(1, kept=1)
        tty.flush()
        drawn = _drain(master, until="4/4")
    os.close(master)
    assert "\r" in drawn and BAR in drawn and "4/4" in drawn, drawn

    plain = io.StringIO()
    monkeypatch.setattr(sys, "stdout", plain)
    monkeypatch.setenv("ABPIPE_PROGRESS_INTERVAL", "0")
    with console.progress("work", total=4, unit="img") as bar:
        for i in range(4):
            bar.update(1, kept=i + 1)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and BAR not in plain.getvalue()
    assert (
        lines[0].startswith("[abpipe] work: 1/4")
        and lines[-1].startswith("[abpipe] work: 4/4")
        and "kept 4" in lines[-1]
    ), lines

    polled = io.StringIO()  # the driver's bar re-sends rank 0's last state while Ray Train shuts down
    monkeypatch.setattr(sys, "stdout", polled)
    with console.progress("work", total=2) as bar:
        bar.goto(2, loss=1.0)
        for _ in range(3):
            bar.goto(2, loss=1.0)
        bar.goto(2, loss=0.5)
    lines = polled.getvalue().splitlines()
    assert len(lines) == 3 and "loss 1" in lines[0] and "loss 0.5" in lines[1], "the same state twice is one line"

    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stdout", quiet)
    monkeypatch.setenv("ABPIPE_PROGRESS_INTERVAL", "3600")
    with console.progress("work", total=4) as bar:
        bar.update(4)
    assert quiet.getvalue().count("\n") == 1, "off a TTY, a short job leaves one line: where it ended"


# ------------------------------------------------------------------- bad input: one line, no traceback


def _coco_with_corrupt_json(tmp: Path) -> list[str]:
    (tmp / "images").mkdir()
    (tmp / "instances.json").write_text('{"images": [')
    return ["ingest", "coco", "--input", str(tmp / "images"), f"ingest.coco.instances={tmp / 'instances.json'}"]


BAD_INPUTS = {
    "missing --config file": lambda tmp: ["train", "--config", str(tmp / "nope.yaml")],
    "config file not YAML": lambda tmp: (
        tmp.joinpath("bad.yaml").write_text("train: [1,\n"),
        ["train", "--config", str(tmp / "bad.yaml")],
    )[1],
    "corrupt COCO instances json": _coco_with_corrupt_json,
    "missing input folder": lambda tmp: ["ingest", "--input", str(tmp / "no_such_folder"), "--out", str(tmp / "out")],
    "override value not YAML": lambda tmp: ["train", "train.lr=[1,"],
    "override without =": lambda tmp: ["train", "train.lr"],
    "unknown config key": lambda tmp: ["train", "train.no_such_key=1"],
    "unknown flag": lambda tmp: ["eval", "--no-such-flag"],
    "missing checkpoint": lambda tmp: [
        "eval",
        "--checkpoint",
        str(tmp / "no_ckpt"),
        f"eval.dataset={tmp}",
        f"paths.root={tmp}",
    ],
    "shards never ingested": lambda tmp: ["train", f"data.shards={tmp / 'no_shards'}", f"paths.root={tmp}"],
    "unreachable Ray address": lambda tmp: [
        "ingest",
        "--input",
        str(tmp),
        "--out",
        str(tmp / "out"),
        "ray.address=127.0.0.1:1",
    ],
}
# the wrong path of these cases, which their line must name (checked before torch and Ray are imported)
NAMES_THE_PATH = {"missing checkpoint": "no_ckpt", "shards never ingested": "no_shards"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(case, tmp_path):
    out = run_plain(BAD_INPUTS[case](tmp_path), timeout=300)
    assert out.returncode != 0
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("abpipe: "), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == "", out.stdout
    if case in NAMES_THE_PATH:
        assert str(tmp_path / NAMES_THE_PATH[case]) in out.stderr, out.stderr


def test_verbose_shows_the_traceback_of_a_bad_input(tmp_path):
    out = run_plain(["train", "--verbose", "--config", str(tmp_path / "nope.yaml")], timeout=300)
    assert (
        out.returncode == 2
        and "Traceback" in out.stderr
        and out.stderr.splitlines()[-1].startswith("abpipe: config error: --config")
    )


# -------------------------------------------------------------- ingest and training through the CLI


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


@pytest.mark.ray
def test_ingest_bar_on_a_tty_plain_lines_and_json_off_it(ray_address, digits_folder, tmp_path):
    common = [
        "ingest",
        "--input",
        str(digits_folder),
        f"ray.address={ray_address}",
        f"paths.root={tmp_path}",
        "ingest.samples_per_shard=100",
    ]
    code, shown = run_tty([*common, "--out", str(tmp_path / "tty")])
    assert code == 0, shown[-3000:]
    assert "\r" in shown and BAR in shown and "300/300" in shown and "kept 300" in shown, shown[-3000:]
    assert shown.count("Ray's logs: ") == 1 and "== ingest ==" in shown

    plain = run_plain([*common, "--out", str(tmp_path / "plain"), "--json"], ABPIPE_PROGRESS_INTERVAL="0")
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = json.loads(plain.stdout)  # stdout is the one JSON document, nothing else
    assert result["counts"] == {"ok": 300} and result["output"] == str(tmp_path / "plain")
    assert "\r" not in plain.stderr and BAR not in plain.stderr
    progress = [line for line in plain.stderr.splitlines() if line.startswith("[abpipe] ingest image_folder: ")]
    assert len(progress) >= 2 and progress[-1].startswith("[abpipe] ingest image_folder: 300/300"), plain.stderr


@pytest.fixture(scope="module")
def train_config(digit_shards, tmp_path_factory) -> Path:
    from tests.test_train import micro_config

    root = tmp_path_factory.mktemp("console_train")
    config = micro_config(root, digit_shards, steps=6)
    cfg = config.to_dict()
    cfg["train"]["log_every_steps"] = 2
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the runs' MLflow store, built here from the session's template (tests/mlflow_template.py): the two CLI
    # processes then open a migrated store instead of each running MLflow's migrations
    from mlflow.tracking import MlflowClient

    MlflowClient(config.tracking.tracking_uri).search_experiments()
    return path


@pytest.mark.ray
def test_training_bar_on_a_tty(ray_address, train_config, tmp_path):
    """The loop in the driver (train.num_workers=0): its steps reach the bar through the same progress board
    as rank 0's (console.remote_progress); the Ray Train path and its quiet workers are the plain test's."""
    code, shown = run_tty(
        [
            "train",
            "--config",
            str(train_config),
            f"ray.address={ray_address}",
            "train.run_name=tty",
            "train.num_workers=0",
        ]
    )
    assert code == 0, shown[-3000:]
    bars = [part for part in shown.replace("\n", "\r").split("\r") if part.startswith("train:")]
    assert bars and BAR in bars[-1] and "6/6" in bars[-1] and "loss" in bars[-1], shown[-3000:]
    assert "== pretraining ==" in shown


@pytest.mark.ray
def test_training_plain_lines_and_json_off_a_tty(ray_address, train_config, tmp_path):
    plain = run_plain(
        ["train", "--json", "--config", str(train_config), f"ray.address={ray_address}", "train.run_name=plain"],
        ABPIPE_PROGRESS_INTERVAL="0",
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = json.loads(plain.stdout)
    assert result["metrics"]["step"] == 6 and result["checkpoint"].endswith("checkpoint_00000006")
    assert "\r" not in plain.stderr and BAR not in plain.stderr
    steps = [line for line in plain.stderr.splitlines() if line.startswith("[abpipe] train: ")]
    assert steps and steps[-1].startswith("[abpipe] train: 6/6") and "loss" in steps[-1], plain.stderr
    assert "RayTrainWorker" not in plain.stderr and "TrainController" not in plain.stderr, (
        "Ray's worker output stays in its log files"
    )
    # rank 0's own log line is not on the console but in Ray's log files, whose folder is named once
    assert "step 6/6 views" not in plain.stderr
    (logs,) = [
        line.split("Ray's logs: ", 1)[1].split(" (")[0] for line in plain.stderr.splitlines() if "Ray's logs: " in line
    ]
    logged = [
        p for p in Path(logs).rglob("*") if p.is_file() and "step 6/6 views 240 " in p.read_text(errors="replace")
    ]
    assert logged, f"rank 0's step line is in none of {logs}"


def test_json_stdout_carries_only_the_result_while_ray_prints_to_stdout(monkeypatch, capfd):
    """Ray's driver prints the raylet's warnings to sys.stdout (log_to_driver or not); with --json they
    go to stderr, and stdout parses as the command's result."""
    from ray._private.worker import print_to_stdstream

    from pipeline import cli

    def noisy_train(args):
        warning = "WARNING: 8 PYTHON worker processes have been started on node: n1 with address: 127.0.0.1."
        print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        print("a library's print")
        return {"run_id": "r1", "metrics": {"step": 6}}

    run, summarize, help_text = cli.COMMANDS["train"]
    monkeypatch.setitem(cli.COMMANDS, "train", (noisy_train, summarize, help_text))
    assert cli.main(["train", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"run_id": "r1", "metrics": {"step": 6}}
    assert "8 PYTHON worker processes" in err and "a library's print" in err
    # without --json, a print still reaches stdout as before
    assert cli.main(["train"]) == 0
    out, _ = capfd.readouterr()
    assert "a library's print" in out
