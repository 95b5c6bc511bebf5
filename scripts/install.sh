#!/usr/bin/env bash
# Create ./.venv and install abpipe (+ test extras) into it. Safe to re-run.
# torch goes first, from pip (not uv): TORCH_SPEC overrides the pinned build, e.g. a CUDA wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

# pip -q still warns once per package for every file:// index of the machine's pip config that lacks
# it ("WARNING: Location 'file:///...' is ignored"): hundreds of lines that say nothing about this
# install. Only those are dropped; pip's errors, other warnings and its exit status come through.
pip_install() {
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "^WARNING: Location 'file://[^']*' is ignored" || true; }
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement specifiers
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || pip_install $TORCH_SPEC
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, ray, mlflow, timm, webdataset, pipeline; print('abpipe installed: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
