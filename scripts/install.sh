#!/usr/bin/env bash
# Create ./.venv and install abpipe (+ test extras) into it. Safe to re-run.
# torch goes first, from pip (not uv): TORCH_SPEC overrides the pinned build, e.g. a CUDA wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -c "import torch, ray, mlflow, timm, webdataset, pipeline; print('abpipe installed: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
