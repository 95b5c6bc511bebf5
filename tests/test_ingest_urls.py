"""URL ingest (cc12m / urls) through img2dataset, against a real HTTP server on 127.0.0.1.

The server serves real JPEGs plus every kind of bad response (404, HTML, truncated JPEG, a
decompression bomb, a response slower than the timeout, an X-Robots-Tag opt-out, a too-small
image); a refused port and non-http(s) URLs complete the set. It counts requests per path, which is
how the resume test proves finished shards are not downloaded again.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import Config, ConfigError, IngestConfig, PathsConfig, UrlIngestConfig
from pipeline.data.shards import load_manifest, load_stats, read_shards

MAX_SIDE = 256


class LoopbackServer:
    """ThreadingHTTPServer on 127.0.0.1 over `root`; `hits` counts requests per path (query included)."""

    def __init__(self, root: Path):
        self.root, self.hits, self.agents = root, Counter(), []
        self.slow_seconds, self.delay_seconds = 4.0, 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    server.agents.append(self.headers.get("User-Agent", ""))
                path = self.path.split("?", 1)[0]
                headers = {"Content-Type": "image/jpeg"}
                if path == "/slow.jpg":
                    time.sleep(server.slow_seconds)
                if path.startswith("/delayed/"):
                    time.sleep(server.delay_seconds)
                if path == "/page.html":
                    body, headers = (
                        b"<!doctype html><html><body>not an image</body></html>",
                        {"Content-Type": "text/html"},
                    )
                else:
                    name = path.lstrip("/")
                    for prefix in ("noai/", "delayed/"):
                        name = name.replace(prefix, "img/", 1) if name.startswith(prefix) else name
                    if path.startswith("/noai/"):
                        headers["X-Robots-Tag"] = "noai"
                    file = server.root / name
                    if not file.is_file():
                        self.send_error(404)
                        return
                    body = file.read_bytes()
                try:
                    self.send_response(200)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): expected
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _refused_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pipeline.data.sample_data import write_photo_files

    root = tmp_path_factory.mktemp("www")
    photos = write_photo_files(root / "img", copies=1, max_side=512)
    Image.open(photos[0]).resize((120, 90)).save(root / "img" / "small.jpg", quality=80)
    jpeg = photos[1].read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("1", (20_000, 10_000)).save(root / "bomb.png")  # 200 Mpixel header, a few kB of bytes
    assert 20_000 * 10_000 > 2 * Image.MAX_IMAGE_PIXELS and (root / "bomb.png").stat().st_size < 1_000_000
    Image.new("RGB", (4, 4), (200, 10, 10)).save(root / "tiny.png")
    srv = LoopbackServer(root)
    srv.photos = [p.name for p in photos]
    yield srv
    srv.close()


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    return path


def _config(tmp_path: Path, urls: Path, out: Path, **cc) -> Config:
    cc = {"processes": 1, "threads": 4, "timeout": 1.0, "retries": 1} | cc
    ing = IngestConfig(
        source="cc12m",
        input=str(urls),
        output=str(out),
        max_side=MAX_SIDE,
        min_side=8,
        samples_per_shard=5,
        cc12m=UrlIngestConfig(**cc),
    )
    return Config(paths=PathsConfig(root=str(tmp_path / "root")), ingest=ing)


def test_every_url_is_kept_or_counted_with_its_reason(ray_cluster, server, tmp_path):
    """The ray distributor (one task per shard on the session's cluster); the resume test runs multiprocessing."""
    from pipeline.ingest import run_ingest

    good = [(server.url(f"/img/{name}"), f"a photo of {Path(name).stem}") for name in server.photos]
    good += [(server.url("/img/small.jpg"), 'the "small" one, ☕')]
    bad = {
        server.url("/missing.jpg"): "download_failed",
        f"http://127.0.0.1:{_refused_port()}/x.jpg": "download_failed",
        server.url("/page.html"): "not_image",
        server.url("/truncated.jpg"): "truncated",
        server.url("/bomb.png"): "too_large",
        server.url("/slow.jpg"): "timeout",
        server.url(f"/noai/{server.photos[0]}"): "opted_out",
        server.url("/tiny.png"): "too_small",
        "file:///etc/passwd": "bad_url",
        "ftp://127.0.0.1/x.jpg": "bad_url",
        "data:image/png;base64,iVBORw0KGgo=": "bad_url",
    }
    rows = []  # interleave good and bad so every shard holds both
    for i, item in enumerate(bad.items()):
        rows += good[i : i + 1] + [(item[0], f"bad {item[1]}")]
    rows += good[len(bad) :]
    out = tmp_path / "shards"
    stats = run_ingest(_config(tmp_path, _write_tsv(tmp_path / "list.tsv", rows), out, distributor="ray"))

    expected = dict(Counter(bad.values())) | {"ok": len(good)}
    assert stats["counts"] == dict(expected) and stats["total"] == len(rows)
    manifest = load_manifest(str(out))
    assert list(manifest["key"]) == [f"{i:09d}" for i in range(len(rows))], "one row per listed URL, keyed by position"
    assert list(manifest["input"]) == [u for u, _ in rows]
    status = dict(zip(manifest["input"], manifest["status"]))
    assert {u: status[u] for u in bad} == bad
    assert all(status[u] == "ok" for u, _ in good)
    assert (manifest["detail"][manifest["status"] != "ok"] != "").all(), "every skip says why"
    assert load_stats(str(out))["counts"] == stats["counts"]

    # What reached the server: failed downloads retried once (retries=1), fetched files never retried.
    assert all(server.hits[f"/img/{n}"] == 1 for n in server.photos)
    assert server.hits["/missing.jpg"] == 2 and server.hits["/slow.jpg"] == 2
    assert server.hits["/bomb.png"] == server.hits["/truncated.jpg"] == server.hits["/page.html"] == 1
    assert not any("passwd" in p for p in server.hits), "file:// never fetched"
    assert all("abpipe" in agent for agent in server.agents), "the user-agent token is sent"

    # Kept samples: readable by read_shards, captions carried, longest side capped, small JPEG untouched.
    samples = read_shards(str(out)).take_all()
    assert len(samples) == len(good)
    captions = dict(rows)
    served = {server.url(f"/img/{n}"): (server.root / "img" / n) for n in server.photos + ["small.jpg"]}
    for sample in samples:
        meta = json.loads(sample["json"])
        url = meta["id"]
        assert meta["source"] == "cc12m" and meta["captions"] == [captions[url]]
        assert sample["__key__"] == manifest.loc[manifest["input"] == url, "key"].item()
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
        original = Image.open(served[url]).size
        scale = min(1.0, MAX_SIDE / max(original))
        assert abs(image.size[0] - original[0] * scale) <= 1 and abs(image.size[1] - original[1] * scale) <= 1
        if max(original) <= MAX_SIDE:
            assert sample["jpg"] == served[url].read_bytes(), "a small JPEG keeps its bytes"
    with tarfile.open(out / stats["shards"][0]) as tar:
        txt = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    assert txt and all(t in captions.values() for t in txt)

    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}").get_run(stats["run_id"])
    assert run.data.tags["abpipe.kind"] == "ingest"
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("count_")} == {
        f"count_{k}": v for k, v in expected.items()
    }


def _tar_keys(out: Path) -> list[str]:
    keys = []
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".jpg")]
    return keys


@pytest.mark.ray  # an ingest subprocess killed mid-run and a second one resuming: the full tier
def test_resume_after_kill_fetches_only_unfinished_shards(server, tmp_path):
    """Kill the CLI after its first shard is written; the re-run downloads nothing of that shard again."""
    fast = [(server.url(f"/img/{n}?resume"), f"fast {n}") for n in server.photos[:3]]
    delayed = [(server.url(f"/delayed/{n}?resume"), f"delayed {n}") for n in server.photos[3:9]]
    urls = _write_tsv(tmp_path / "list.tsv", fast + delayed)
    out = tmp_path / "shards"
    abpipe = str(Path(sys.executable).parent / "abpipe")
    overrides = [
        f"paths.root={tmp_path / 'root'}",
        f"ingest.max_side={MAX_SIDE}",
        "ingest.min_side=8",
        "ingest.samples_per_shard=3",
        "ingest.cc12m.processes=1",
        "ingest.cc12m.threads=3",
        "ingest.cc12m.timeout=10",
        "ingest.cc12m.retries=0",
    ]
    command = [abpipe, "ingest", "cc12m", "--urls", str(urls), "--out", str(out), *overrides]

    server.delay_seconds = 4.0  # the later shards take long enough to kill the run in between
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    part0 = out / "_parts" / "shard-000000.parquet"
    deadline = time.time() + 240
    while not part0.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the CLI and img2dataset's worker processes
    first.wait()
    assert part0.exists(), "the first shard was written before the kill"
    assert not (out / "manifest.parquet").exists(), "killed before the end"
    assert not (out / "_parts" / "shard-000002.parquet").exists()
    from pipeline.data.sources.url_captions import _collect_manifest
    from pipeline.data.sources.url_list import read_url_list

    killed = _collect_manifest(
        read_url_list(str(urls), UrlIngestConfig()), IngestConfig(output=str(out), samples_per_shard=3), "cc12m", 3, {}
    )
    assert list(killed["status"]) == ["ok"] * 3 + ["incomplete"] * 6, "what a killed run leaves is counted, not lost"
    assert killed["detail"].iloc[-1].endswith("re-run the same command to fetch it")

    server.delay_seconds = 0.0
    from pipeline.ingest import run_ingest

    cfg = _config(tmp_path, urls, out, threads=3, timeout=10.0, retries=0)
    cfg.ingest.samples_per_shard = 3
    run_ingest(cfg)  # the same settings as the command line above (a CLI re-run costs another start-up)
    assert all(server.hits[u[len(server.base) :]] == 1 for u, _ in fast), "finished shard not downloaded again"
    assert all(server.hits[u[len(server.base) :]] in (1, 2) for u, _ in delayed)
    stats = load_stats(str(out))
    assert stats["counts"] == {"ok": 9} and stats["shards"] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    manifest = load_manifest(str(out))
    assert len(manifest) == 9 and manifest["key"].is_unique
    keys = _tar_keys(out)
    assert sorted(keys) == sorted(manifest["key"]), "no duplicates, nothing lost"

    # A third run of a finished ingest fetches nothing and reports the same.
    hits_before = sum(server.hits.values())
    again = run_ingest(cfg)
    assert sum(server.hits.values()) == hits_before
    assert again["counts"] == stats["counts"] and _tar_keys(out) == keys

    cfg.ingest.samples_per_shard = 4
    with pytest.raises(ConfigError, match="samples_per_shard"):
        run_ingest(cfg)


def test_url_list_refuses_what_it_must_not_fetch(tmp_path):
    """Parsing alone (no download): non-http(s), empty, host-less and malformed rows become bad_url rows."""
    from pipeline.data.sources.url_list import read_url_list

    lines = [
        "http://example.com/a.jpg\tplain",
        'https://example.com/b.jpg\twith "quotes" inside',
        "file:///etc/passwd\tlocal file",
        "FTP://example.com/c.jpg\tftp",
        "data:image/png;base64,AAAA\tinline",
        "\tno url",
        "http:///nohost.jpg\tno host",
        "http://example.com/d.jpg\tone\textra column",
    ]
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    listing = read_url_list(str(tsv), UrlIngestConfig(columns=["url", "caption"]))
    assert listing.urls == ["http://example.com/a.jpg", "https://example.com/b.jpg"]
    assert listing.captions == ["plain", 'with "quotes" inside'] and listing.keys == ["000000000", "000000001"]
    refused = {r["key"]: r for r in listing.refused}
    assert sorted(refused) == [f"{i:09d}" for i in range(2, 8)] and listing.total == len(lines)
    assert "'file' refused" in refused["000000002"]["detail"] and "'ftp' refused" in refused["000000003"]["detail"]
    assert "'data' refused" in refused["000000004"]["detail"] and refused["000000005"]["detail"] == "empty URL"
    assert refused["000000006"]["detail"] == "no host in URL"
    assert (
        refused["000000007"]["detail"].startswith("malformed row") and "extra column" in refused["000000007"]["input"]
    )
    assert all(r["status"] == "bad_url" for r in listing.refused)

    with pytest.raises(ConfigError, match=r"columns=\[url,caption\]"):
        read_url_list(str(tsv), UrlIngestConfig())  # headerless without `columns`: first row taken as header

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"URL": ["https://x.org/1.jpg", None], "TEXT": ["one", "two"]}), tmp_path / "laion.parquet")
    listing = read_url_list(str(tmp_path / "laion.parquet"), UrlIngestConfig(url_col="URL", caption_col="TEXT"))
    assert listing.urls == ["https://x.org/1.jpg"] and [r["detail"] for r in listing.refused] == ["empty URL"]
    (tmp_path / "urls.txt").write_text("# comment\nhttps://x.org/1.jpg\n\nhttp://x.org/2.png\n")
    assert read_url_list(str(tmp_path / "urls.txt"), UrlIngestConfig()).captions == ["", ""]


def test_img2dataset_errors_map_to_reasons():
    """img2dataset's messages (as it words them; seen in the end-to-end test) -> our skip reasons."""
    from pipeline.data.sources.img2dataset_shards import skip_reason

    cases = {
        ("failed_to_download", "HTTP Error 404: Not Found"): "download_failed",
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>"): "download_failed",
        ("failed_to_download", "timed out"): "timeout",
        ("failed_to_download", "<urlopen error timed out>"): "timeout",
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"): "opted_out",
        ("failed_to_download", "<urlopen error unknown url type: file>"): "bad_url",
        ("failed_to_resize", "image too small"): "too_small",
        ("failed_to_resize", "image area too large"): "too_large",
        ("failed_to_resize", "Image decoding error"): "corrupt",
        ("failed_to_resize", "abpipe truncated: image file is truncated"): "truncated",
        ("failed_to_resize", "abpipe not_a_reason: x"): "corrupt",
    }
    assert {case: skip_reason(*case) for case in cases} == cases


def test_download_guard_refuses_bombs_from_the_header(server):
    """The guard in front of img2dataset's OpenCV decoder: a bomb is refused without decoding pixels, bad files
    get a precise reason."""
    from img2dataset.resizer import Resizer

    from pipeline.data.sources.img2dataset_runner import GuardedResizer

    kwargs = dict(image_size=MAX_SIDE, resize_mode="keep_ratio_largest", resize_only_if_bigger=True)
    guard, plain = GuardedResizer(**kwargs), Resizer(**kwargs)
    truncated = (server.root / "truncated.jpg").read_bytes()
    started = time.perf_counter()
    bomb = guard(io.BytesIO((server.root / "bomb.png").read_bytes()))
    assert bomb[0] is None and bomb[-1].startswith("abpipe too_large:")
    assert time.perf_counter() - started < 1.0, "refused from the header, not after decoding 200 Mpixels"
    assert guard(io.BytesIO(truncated))[-1].startswith("abpipe truncated:")
    assert plain(io.BytesIO(truncated))[-1] == "Image decoding error", "OpenCV alone cannot say why"
    assert guard(io.BytesIO(b"<html>hi</html>"))[-1].startswith("abpipe not_image:")
    photo = (server.root / "img" / server.photos[0]).read_bytes()
    assert guard(io.BytesIO(photo))[1:] == plain(io.BytesIO(photo))[1:], "a good image passes unchanged"


def test_cli_ingest_source_and_flags():
    from pipeline.cli import build_parser, ingest_config, main

    def parse(argv):
        args, rest = build_parser().parse_known_args(argv)
        args.overrides += rest
        return ingest_config(args).ingest

    ing = parse(["ingest", "cc12m", "--urls", "my list: 1.tsv", "--out", "s3://bucket/cc12m", "ingest.cc12m.threads=8"])
    assert (ing.source, ing.input, ing.output, ing.cc12m.threads) == ("cc12m", "my list: 1.tsv", "s3://bucket/cc12m", 8)
    ing = parse(["ingest", "ingest.input=/data/x", "ingest.source=files"])
    assert (ing.source, ing.input) == ("files", "/data/x") and ing.output.endswith("shards/files")
    assert parse(["ingest", "--input", "/d", "urls", "ingest.source=files"]).source == "urls", "SOURCE wins"
    with pytest.raises(ConfigError, match="at most one SOURCE"):
        parse(["ingest", "cc12m", "coco"])
    with pytest.raises(SystemExit):
        main(["ingest", "cc12m", "--bogus"])
    assert main(["ingest", "nosuch", "--urls", "x"]) == 2, "unknown source: a config error, not a traceback"
    assert main(["ingest", "cc12m", "--urls", "x.tsv", "--out", "nosuchfs://bucket/x"]) == 2, (
        "an output img2dataset cannot write"
    )
