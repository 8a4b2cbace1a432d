#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent). torch goes first, pinned: an unpinned torch
# pulled in by another package would resolve to a CUDA build with gigabytes of extra packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q -r requirements-torch.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, diffusers; print('torch', torch.__version__, '| diffusers', diffusers.__version__)"
