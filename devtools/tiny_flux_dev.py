"""tiny-flux-dev: the tiny FLUX twin (devtools/tiny_flux.py) with FLUX.1-dev's scheduler config (dynamic shifting).

tiny-flux pairs a guidance embedding (dev) with schnell's unshifted scheduler, a pairing no real FLUX.1 model has;
this copy is a consistent dev-like model (ComfyUI gives such a model ModelSamplingFlux's shifted schedule). Same
weights, written under ``DIR/tiny-flux-dev/diffusers/`` after tiny-flux.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DEV_SCHEDULER = dict(  # black-forest-labs/FLUX.1-dev's scheduler_config.json
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def write_tiny_flux_dev(out: Path) -> dict[str, Path]:
    """Copy ``out``/tiny-flux to ``out``/tiny-flux-dev with the dev scheduler config; return its path."""
    root = Path(out) / "tiny-flux-dev"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(Path(out) / "tiny-flux", root)
    config_path = root / "diffusers" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(DEV_SCHEDULER)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"tiny-flux-dev": root}
