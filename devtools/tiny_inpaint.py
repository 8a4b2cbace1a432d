"""A tiny SD1.5 inpainting model (9-channel UNet: latents, mask, masked image): the tiny SD1.5 with another UNet.

Under ``DIR/tiny-sd15-inpaint/diffusers/``: tiny-sd15's diffusers folder, its UNet replaced by a random-weight one
with ``in_channels=9`` (the layout of runwayml's inpainting checkpoints). Called by devtools/tiny_models.py's
``build_arch`` for sd15; the same seed gives byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from devtools.tiny_models import SEED_OFFSETS, unet_config

SEED_OFFSET = SEED_OFFSETS["unet"] + 70  # not the base model's UNet seed


def write_tiny_inpaint(out: Path, seed: int) -> dict[str, Path]:
    """Write tiny-sd15-inpaint next to tiny-sd15 (which must be built already) under ``out``; return its path."""
    root = out / "tiny-sd15-inpaint"
    folder = root / "diffusers"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(out / "tiny-sd15" / "diffusers", folder, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(seed * 100 + SEED_OFFSET)
    UNet2DConditionModel(**{**unet_config("sd15"), "in_channels": 9}).save_pretrained(folder / "unet",
                                                                                        safe_serialization=True)
    return {"tiny-sd15-inpaint": root}
