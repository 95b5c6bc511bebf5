"""Shards on S3-compatible object storage (moto's server on 127.0.0.1, IAM auth on), through the same
pyarrow filesystem code as local folders: the CLI ingest, reading back, one clear line for bad
credentials / a missing bucket / an endpoint that stops mid-write, and a re-run that resumes."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import pytest
from PIL import Image

from tests.servers import BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY


def _ingest(argv: list[str]) -> int:
    from pipeline.cli import main

    return main(["ingest", *argv])


def _members(tar_file) -> dict[str, bytes]:
    with tarfile.open(fileobj=tar_file) if isinstance(tar_file, io.BytesIO) else tarfile.open(tar_file) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.ray
def test_cli_ingest_to_s3_writes_the_same_shards_as_a_local_ingest(
    ray_cluster, s3_server, digits_folder, digit_shards, tmp_path, capsys
):
    from pipeline.data.shards import load_manifest, load_stats, read_shards

    out = f"s3://{BUCKET}/shards/digits"
    rc = _ingest(
        [
            "image_folder",
            "--input",
            str(digits_folder),
            "--out",
            out,
            f"paths.root={tmp_path}",
            "ingest.samples_per_shard=100",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    keys = set(s3_server.keys("shards/digits/"))
    assert {f"shards/digits/shard-00000{i}.tar" for i in range(3)} <= keys
    assert {"shards/digits/manifest.parquet", "shards/digits/_stats.json"} <= keys and not [
        k for k in keys if k.endswith(".tmp")
    ]
    # one code path: the objects hold exactly what the local ingest of the same folder wrote
    client = s3_server.client()
    for i in range(3):
        body = client.get_object(Bucket=BUCKET, Key=f"shards/digits/shard-00000{i}.tar")["Body"].read()
        assert _members(io.BytesIO(body)) == _members(digit_shards / f"shard-00000{i}.tar")
    assert load_stats(out)["counts"] == {"ok": 300} and len(load_manifest(out)) == 300
    assert read_shards(out).count() == 300


@pytest.mark.ray
def test_bad_credentials_and_a_missing_bucket_are_one_line_each(
    ray_cluster, s3_server, digits_folder, tmp_path, capsys, monkeypatch
):
    from pipeline.cli import main

    base = ["image_folder", "--input", str(digits_folder), f"paths.root={tmp_path}"]
    cases = [
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, f"s3://{BUCKET}/shards/x", "refused the credentials"),
        ({"AWS_ACCESS_KEY_ID": "AKIANOTAKEY000000000"}, f"s3://{BUCKET}/shards/x", "refused the credentials"),
        ({}, "s3://no-such-bucket/shards/x", "bucket does not exist"),
    ]
    for env, out, expected in cases:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            started = time.perf_counter()
            assert _ingest([*base, "--out", out]) == 2
            elapsed = time.perf_counter() - started
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("abpipe: storage error: ") and expected in err[0], err
        assert out.split("//", 1)[1] in err[0] and S3_SECRET_KEY not in err[0] and elapsed < 60
    # training on a missing bucket: the same line, before any worker starts
    assert main(["train", f"paths.root={tmp_path}", "train.storage_path=s3://no-such-bucket/ray_results"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bucket does not exist" in err[0] and "no-such-bucket/ray_results" in err[0], err
    assert S3_ACCESS_KEY not in str(err)


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory, photo_files):
    """Big JPEGs: slow enough to decode that an ingest of them can be caught mid-way."""
    folder = tmp_path_factory.mktemp("large")
    paths = []
    for i, p in enumerate(photo_files[:4]):
        Image.open(p).convert("RGB").resize((1800, 1350)).save(folder / f"large{i}.jpg", quality=95)
        paths.append(str(folder / f"large{i}.jpg"))
    return paths


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_endpoint_stopping_mid_ingest_is_one_line_and_a_rerun_resumes(
    ray_cluster, s3_server, large_photos, tmp_path, capsys
):
    from pipeline.data.shards import load_manifest

    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(large_photos[i % 4] for i in range(60)) + "\n")
    out, prefix = f"s3://{BUCKET}/shards/stopped", "shards/stopped/"
    argv = [
        "files",
        "--input",
        str(listing),
        "--out",
        out,
        f"paths.root={tmp_path}",
        "ingest.samples_per_shard=3",
        "ingest.max_side=48",
    ]
    result: dict = {}
    writer = threading.Thread(target=lambda: result.update(rc=_ingest(argv)), daemon=True)
    writer.start()
    deadline = time.monotonic() + 300
    while len([k for k in s3_server.keys(prefix + "_parts/") if k.endswith(".parquet")]) < 3:
        assert writer.is_alive(), f"the ingest ended before it could be interrupted: {capsys.readouterr()}"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    s3_server.stop()  # the endpoint goes away mid-write
    writer.join(timeout=300)
    s3_server.start()
    assert not writer.is_alive() and result["rc"] == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("abpipe")]
    assert (
        len(err) == 1 and "storage endpoint is unreachable" in err[0] and "re-run the same command to resume" in err[0]
    ), err

    finished = {
        k: s3_server.client().head_object(Bucket=BUCKET, Key=k)["ETag"]
        for k in s3_server.keys(prefix)
        if k.endswith(".tar")
    }
    parts = {
        k.rsplit("/", 1)[1].replace(".parquet", ".tar")
        for k in s3_server.keys(prefix + "_parts/")
        if k.endswith(".parquet")
    }
    assert 0 < len(parts) < 20, f"the stop must land mid-way ({len(parts)} of 20 shards had finished)"
    assert _ingest(argv) == 0
    log = capsys.readouterr().out
    assert f"{len(parts)} of 20 shards already finished" in log, log[-2000:]
    keys = s3_server.keys(prefix)
    for key, etag in finished.items():  # a finished shard is kept as it was
        if key.rsplit("/", 1)[1] in parts:
            assert s3_server.client().head_object(Bucket=BUCKET, Key=key)["ETag"] == etag
    assert not [k for k in keys if k.endswith(".tmp")] and len([k for k in keys if k.endswith(".tar")]) == 20
    manifest = load_manifest(out)
    assert len(manifest) == 60 and manifest["key"].is_unique and (manifest["status"] == "ok").all()
    in_tars = []  # every item exactly once in the tars: no half-written shard was kept, none is missing
    for key in sorted(k for k in keys if k.endswith(".tar")):
        with tarfile.open(
            fileobj=io.BytesIO(s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
        ) as tar:
            in_tars += [n.split(".")[0] for n in tar.getnames() if n.endswith(".json")]
    assert sorted(in_tars) == [f"{i:09d}" for i in range(60)]
    stats = json.loads(s3_server.client().get_object(Bucket=BUCKET, Key=prefix + "_stats.json")["Body"].read())
    assert stats["counts"] == {"ok": 60} and len(stats["shards"]) == 20


def test_checkpoints_on_s3_are_listed_resolved_and_copied_like_local_ones(s3_server, tmp_path):
    """What a resubmitted job, `abpipe eval s3://…` and a sweep read on object storage (no Ray needed)."""
    from pipeline.checkpoints import (
        CheckpointError,
        latest_checkpoint,
        resolve_checkpoint,
        save_checkpoint,
    )
    from pipeline.eval.sweep import _storage_checkpoints
    from pipeline.storage import filesystem

    storage, run_id = f"s3://{BUCKET}/ckpts/ray_results", "0123456789abcdef0123456789abcdef"
    fs, base = filesystem(storage)
    for step in (4, 10, 12):
        local = save_checkpoint(tmp_path / f"c{step}", {"w": [step]}, {"step": step, "mlflow_run_id": run_id})
        for name in ("state.pt", "meta.json"):
            if step == 12 and name == "meta.json":
                continue  # an upload cut short: no meta.json, so not a complete checkpoint
            with fs.open_output_stream(f"{base}/run/checkpoint_{step:08d}/{name}") as stream:
                stream.write((local / name).read_bytes())
    uri, meta = latest_checkpoint(storage, "run")
    assert uri == f"{storage}/run/checkpoint_00000010" and meta["mlflow_run_id"] == run_id and meta["step"] == 10
    assert latest_checkpoint(storage, "no-such-run") is None
    assert _storage_checkpoints(storage, "run") == [f"{storage}/run/checkpoint_{s:08d}" for s in (4, 10, 12)]
    local, source_run, recorded = resolve_checkpoint(uri, "sqlite:///unused.db", str(tmp_path / "dl"))
    assert recorded == uri and source_run is None and (tmp_path / "dl" / "checkpoint_00000010" / "state.pt").is_file()
    with pytest.raises(CheckpointError, match="checkpoint_00000099"):
        resolve_checkpoint(f"{storage}/run/checkpoint_00000099", "sqlite:///unused.db", str(tmp_path / "dl"))
