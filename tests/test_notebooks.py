"""The notebooks run end to end (nbclient, a real kernel, a real local Ray and MLflow store)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def outputs(nb) -> str:
    return "\n".join(
        o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.ray  # the quickstart starts its own local Ray in the kernel
@pytest.mark.timeout(900)
def test_quickstart_then_results_notebook(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="abpnb-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        "ABPIPE_ROOT": str(tmp_path / "root"),
        "ABPIPE_RAY_TMP": ray_tmp,
        "ABPIPE_QUICKSTART_STEPS": "10",
        "ABPIPE_QUICKSTART_PER_CLASS": "40",
    }
    quick = execute("quickstart.ipynb", env)
    text = outputs(quick)
    assert "'ok': 400" in text  # every digit written was ingested
    assert "knn_top1" in text and "linear_top1" in text
    images = sum("image/png" in o.get("data", {}) for c in quick.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2  # the crops figure and the curves figure were drawn

    results = execute("results.ipynb", {"ABPIPE_TRACKING_URI": f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}"})
    text = outputs(results)
    assert "quickstart" in text and "knn_top1" in text  # the comparison table has the run and its probes
    shutil.rmtree(ray_tmp, ignore_errors=True)  # the kernel's Ray session logs; kept when a check above failed
