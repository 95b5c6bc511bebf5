"""Look at a pretraining run the way users do: in the MLflow UI, through a real headless browser.

Runs a short pretraining on the photos scikit-image ships (ingest -> pretrain, local Ray), starts
`mlflow server` on 127.0.0.1 (a free port) over the run's sqlite store, and has headless Chromium
screenshot the run's pages: overview (metrics), model metrics (charts), and the artifact viewer on
the start-of-run preview images and the end-of-run learning curves. Every screenshot is checked to
be a PNG of the window size with real content (not one flat colour); the paths are printed.

    apt-get install -y chromium                        # Debian's package; or --chromium PATH
    python scripts/check_mlflow_ui.py --out docs/images

Only processes this script starts are stopped (by their process ids).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
WINDOW = (1400, 1000)
# An artifact page is ready when its image (shown from a blob: URL) has loaded; the overview when
# its metrics table is there (scrolled into view for the shot).
IMAGE_LOADED = "[...document.images].some(i => i.complete && i.naturalWidth * i.naturalHeight >= 60000)"
SHOW_METRICS = "document.querySelector('input[placeholder=\"Search metrics\"]')?.scrollIntoView({block: 'start'})"
PAGES = {  # screenshot name -> (run page path, JavaScript true once the page shows it, JavaScript run before the shot)
    "mlflow_run_overview.png": ("", "document.body.innerText.includes('loss_annotation')", SHOW_METRICS),
    "mlflow_run_model_metrics.png": (
        "/model-metrics",
        "document.querySelectorAll('canvas, svg.main-svg').length >= 3",
        "",
    ),
    "mlflow_run_preview_boxes.png": ("/artifactPath/preview/source_boxes.png", IMAGE_LOADED, ""),
    "mlflow_run_preview_annotations.png": ("/artifactPath/preview/annotations.png", IMAGE_LOADED, ""),
    "mlflow_run_learning_curves.png": ("/artifactPath/learning_curves.png", IMAGE_LOADED, ""),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(root: Path) -> tuple[str, str, str]:
    """(tracking uri, experiment id, run id) of a short run on shipped photos."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import RayConfig, load_config
    from pipeline.data.sample_data import write_photo_shards
    from pipeline.runtime import init_ray
    from pipeline.train.trainer import run_pretrain

    overrides = [
        f"paths.root={root}",
        f"data.shards={root / 'data' / 'shards'}",
        "data.shuffle_buffer=16",
        "views.view_size=64",
        "views.batch_size=12",
        "views.concurrency=1",
        "views.scale=[0.2,1.0]",
        "model.encoder_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
        "train.batch_size=12",
        f"train.total_views={30 * 12 * 6}",
        "train.log_every_steps=2",
        "train.checkpoint_every_steps=1000",
        "train.run_name=ui-check",
        "tracking.experiment=ui-check",
    ]
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides).resolved()
    init_ray(RayConfig(num_cpus=2, temp_dir=str(root / "ray")))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_photo_shards(root / "data", n=24, samples_per_shard=12, max_side=256)
        result = run_pretrain(cfg)
    finally:
        ray.shutdown()
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result["run_id"])
    return cfg.tracking.tracking_uri, run.info.experiment_id, run.info.run_id


def start_server(tracking_uri: str, port: int, log: Path, timeout: float) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers: a faster start
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise TimeoutError(f"mlflow server not up on port {port} after {timeout:.0f} s: {log.read_text()[-1000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM this server's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): a page is shot
    once what it must show is there (a JavaScript condition), not after a guessed delay."""

    def __init__(self, chromium: str, profile: Path):
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline, line = time.time() + 120, ""
        while time.time() < deadline and "DevTools listening on" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}) before its DevTools endpoint was up")
        if "DevTools listening on" not in line:
            stop(self.proc)
            raise TimeoutError("chromium's DevTools endpoint did not come up in 120 s")
        self.http = "http://" + line.split("ws://", 1)[1].split("/", 1)[0]

    def shot(self, url: str, ready_js: str, before_js: str, path: Path, timeout: float) -> None:
        import asyncio

        asyncio.run(self._shot(url, ready_js, before_js, path, timeout))

    async def _shot(self, url: str, ready_js: str, before_js: str, path: Path, timeout: float) -> None:
        import asyncio
        import base64
        import json

        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.put(
                f"{self.http}/json/new?about:blank"
            ) as resp:  # a '#' would not survive the query string
                target = await resp.json(content_type=None)
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params):
                    msg_id = next(ids)
                    await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if data.get("id") == msg_id:
                            if "error" in data:
                                raise RuntimeError(f"{method}: {data['error']}")
                            return data["result"]
                    raise RuntimeError("DevTools connection closed")

                async def capture(to: Path) -> None:
                    shot = await call("Page.captureScreenshot", format="png")
                    to.write_bytes(base64.b64decode(shot["data"]))

                await call(
                    "Emulation.setDeviceMetricsOverride",
                    width=WINDOW[0],
                    height=WINDOW[1],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await call("Page.navigate", url=url)
                deadline = time.time() + timeout
                while True:
                    result = await call("Runtime.evaluate", expression=ready_js, returnByValue=True)
                    if result.get("result", {}).get("value") is True:
                        break
                    if time.time() > deadline:
                        failed = path.with_suffix(".not-ready.png")
                        await capture(failed)
                        text = await call(
                            "Runtime.evaluate", expression="document.body.innerText.slice(0, 600)", returnByValue=True
                        )
                        raise TimeoutError(
                            f"{url}: not ready after {timeout:.0f} s ({ready_js}); page so far in {failed}: "
                            f"{text.get('result', {}).get('value')!r}"
                        )
                    await asyncio.sleep(1.0)
                if before_js:
                    await call("Runtime.evaluate", expression=before_js)
                await asyncio.sleep(1.0)  # let the last layout settle
                await capture(path)
            await session.get(f"{self.http}/json/close/{target['id']}")

    def close(self) -> None:
        stop(self.proc)


def check_png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG" or im.size != WINDOW:
            raise RuntimeError(f"{path}: {im.format} {im.size}, expected a {WINDOW} PNG")
        pixels = np.asarray(im.convert("RGB"))
    if len(np.unique(pixels.reshape(-1, 3), axis=0)) < 50:
        raise RuntimeError(f"{path}: (almost) one flat colour: the page did not render")


def shoot(args, out: Path, root: Path, tracking_uri: str, experiment_id: str, run_id: str) -> None:
    """Serve the store on a free loopback port and screenshot every page of PAGES."""
    port = free_port()
    server = start_server(tracking_uri, port, root / "mlflow-server.log", args.timeout)
    browser = None
    try:
        with tempfile.TemporaryDirectory(prefix="abpipe-chromium-") as profile:
            browser = Browser(args.chromium, Path(profile))
            for name, (page, ready, before) in PAGES.items():
                url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}{page}"
                browser.shot(url, ready, before, out / name, args.timeout)
                check_png(out / name)
                print(f"{out / name}  <- {url}")
    finally:
        if browser is not None:
            browser.close()
        stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "images"), help="folder for the screenshots")
    parser.add_argument("--root", default=None, help="run folder (default: a temporary one, removed at the end)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds the server may take to start, and each page to show what it must",
    )
    parser.add_argument(
        "--run", default=None, help="EXPERIMENT_ID/RUN_ID in --root's store: shoot that run, do not train"
    )
    args = parser.parse_args()
    if not args.chromium:
        print("check_mlflow_ui: no chromium found (apt-get install -y chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    root = Path(args.root or tempfile.mkdtemp(prefix="abpipe-ui-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.run:
            tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
            experiment_id, run_id = args.run.split("/")
        else:
            tracking_uri, experiment_id, run_id = pretrain(root)
        shoot(args, out, root, tracking_uri, experiment_id, run_id)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
