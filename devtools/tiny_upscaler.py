"""Tiny random-weight ESRGAN (RRDBNet) upscalers, x2 and x4, as .safetensors in the key layout spandrel detects.

Written under ``DIR/tiny-upscalers/`` (``tiny-esrgan-x2.safetensors``, ``tiny-esrgan-x4.safetensors``): the classic
ESRGAN layout (``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``, ...) that A1111's ESRGAN models such as
4x-UltraSharp use, with 8 filters and one RRDB block instead of 64 and 23. Random weights: the images are noise-like
but have exactly the model's scale, which is what tests need. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SCALES = (2, 4)
NUM_FILTERS = 8  # real: 64
NUM_BLOCKS = 1  # real: 23
SEED_OFFSET = 7  # after devtools/tiny_models.py's SEED_OFFSETS


def write_tiny_upscalers(out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/tiny-upscalers/tiny-esrgan-x{2,4}.safetensors; {"upscaler-x2": path, "upscaler-x4": path}."""
    from sd_core.upscalers import import_spandrel

    import_spandrel()  # (torchvision or its stand-in first)
    from spandrel.architectures.ESRGAN import ESRGAN  # spandrel's own RRDBNet: its state dict is the real layout

    folder = Path(out) / "tiny-upscalers"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for scale in SCALES:
        torch.manual_seed(seed * 1000 + SEED_OFFSET + scale)
        model = ESRGAN(num_filters=NUM_FILTERS, num_blocks=NUM_BLOCKS, scale=scale)
        with torch.no_grad():  # the default init gives near-constant images: spread the weights a little
            for parameter in model.parameters():
                parameter.mul_(2.0)
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        path = folder / f"tiny-esrgan-x{scale}.safetensors"
        save_file(state, path, metadata={"format": "pt"})
        paths[f"upscaler-x{scale}"] = path
    return paths
