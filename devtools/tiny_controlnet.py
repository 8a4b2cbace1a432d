"""Tiny random-weight ControlNets (diffusers folders) made from the tiny UNets, for SD1.5 and SDXL.

Written under ``DIR/controlnets/tiny-<arch>-control-<a|b>/``. ``ControlNetModel.from_unet`` gives the ControlNet the
UNet's layout; its weights are drawn at random (not copied from the UNet) and the zero-initialised convolutions a real
ControlNet starts training with are drawn too: with zeros it would change nothing. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEED_OFFSET = 8  # after devtools/tiny_models.py's SEED_OFFSETS and tiny_upscaler's
VARIANTS = ("a", "b")  # two ControlNets per architecture: MultiControlNet tests
CONDITIONING_CHANNELS = (8, 8, 16, 16)  # real: (16, 32, 96, 256); 3 downsamplings = the VAE's 8x
ZERO_CONV_STD = 0.5  # the weight scale of the (normally zero) output convolutions: a visible but tame effect


def write_tiny_controlnets(unet, arch: str, out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/controlnets/tiny-<arch>-control-{a,b}/ from ``unet``; {"controlnet-<arch>-a": folder, ...}."""
    from diffusers import ControlNetModel

    paths = {}
    for index, variant in enumerate(VARIANTS):
        torch.manual_seed(seed * 1000 + SEED_OFFSET * 10 + index + (100 if arch == "sdxl" else 0))
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
                                          load_weights_from_unet=False)
        with torch.no_grad():
            zero_convs = [model.controlnet_cond_embedding.conv_out, model.controlnet_mid_block,
                          *model.controlnet_down_blocks]
            for conv in zero_convs:
                conv.weight.normal_(0.0, ZERO_CONV_STD)
                conv.bias.normal_(0.0, ZERO_CONV_STD)
        folder = Path(out) / "controlnets" / f"tiny-{arch}-control-{variant}"
        model.save_pretrained(folder, safe_serialization=True)
        paths[f"controlnet-{arch}-{variant}"] = folder
    return paths
