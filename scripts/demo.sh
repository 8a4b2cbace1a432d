#!/usr/bin/env bash
# The main job on the embedded defaults: set up, build the tiny RANDOM-WEIGHT model into ./bucket (local
# storage), and generate a real PNG through sd_core with it. The image is noise-like: the weights are random.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
[ -f bucket/tiny-sd15/diffusers/model_index.json ] && [ -d bucket/tiny-safety-checker/passes ] || .venv/bin/python -m devtools.tiny_models --out bucket
.venv/bin/python -m sd_core generate --out outputs \
  --request '{"prompt": "a lighthouse at dawn", "seed": 42, "num_outputs": 2, "scheduler": "DPM++ 2M Karras"}'
