#!/usr/bin/env bash
# Download, here, the Python 3.12 wheels that scripts/gpu_check.sh needs on the GPU machine and that its image lacks
# (docs/development.md, "GPU check"): diffusers and pydantic with their missing dependencies. Nothing else: the
# machine's own torch, transformers, peft, safetensors, accelerate, huggingface-hub, numpy, scipy, pillow, pyyaml,
# requests, regex, filelock, urllib3 are used; boto3 is imported lazily (S3 only) and not needed there.
# Versions: requirements.txt's pins, else the ones installed in .venv (what the tests ran with).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu-wheels}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
pin() {  # NAME -> NAME==VERSION from requirements.txt, else from the local environment
    local line
    line=$(grep -i -E "^$1==" requirements.txt || true)
    if [ -n "$line" ]; then echo "$line"; else
        echo "$1==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")"; fi
}
rm -rf "$DEST"
mkdir -p "$DEST"
specs=()
for name in diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    specs+=("$(pin "$name")")
done
echo "downloading into $DEST: ${specs[*]}" >&2
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "${specs[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
count=$(find "$DEST" -name '*.whl' | wc -l)
[ "$count" -eq "${#specs[@]}" ] || { echo "expected ${#specs[@]} wheels in $DEST, got $count" >&2; exit 1; }
du -sh "$DEST" | awk '{print "wheels: " $1 " in " $2 " (the device tool carries at most 64 MiB with the tree)"}'
ls "$DEST"
