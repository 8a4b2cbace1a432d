#!/usr/bin/env bash
# One-shot GPU check (docs/development.md, "GPU check"): on a CUDA machine, builds real-size random-weight SD1.5 and
# SDXL there and prints one markdown table for BENCHMARKS.md (also written to $OUT/gpu_check.md when OUT is set).
#   scripts/gpu_check.sh [--tiny] [--no-compile] [--skip ROWS] [--budget-s S]   (options: scripts/bench/gpu_check.py)
# Missing Python packages (diffusers, pydantic) are installed from .gpu-wheels/ (made here by
# scripts/ops/gpu_wheels.sh) into a scratch folder put on PYTHONPATH, so the machine's own torch is used.
# Progress goes to stderr, the table to stdout. The whole run stops after GPU_CHECK_TIMEOUT_S (default 460) seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PYTHON" -c "import diffusers, pydantic" 2>/dev/null; then
    deps=${GPU_CHECK_DEPS:-/tmp/gpu-check-deps}
    if ! compgen -G ".gpu-wheels/*.whl" >/dev/null; then
        echo "gpu_check: diffusers/pydantic missing and no .gpu-wheels/: run scripts/ops/gpu_wheels.sh here and" \
            "carry .gpu-wheels" >&2
        exit 2
    fi
    echo "gpu_check: installing $(find .gpu-wheels -name '*.whl' | wc -l) wheels into $deps" >&2
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$deps" .gpu-wheels/*.whl >&2
    export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - >&2 <<'PY' || true
import importlib.metadata as m, sys
names = ("torch", "diffusers", "transformers", "peft", "safetensors", "accelerate", "huggingface-hub", "pydantic")
found = []
for name in names:
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        found.append(f"{name} missing")
print("gpu_check: Python", sys.version.split()[0], "|", ", ".join(found))
PY
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-460}" "$PYTHON" -m scripts.bench.gpu_check "$@"
