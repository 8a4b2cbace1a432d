"""A tiny random-weight SDXL Union ControlNet (diffusers' ControlNetUnionModel, xinsir's ControlNet++ layout).

Written under ``DIR/controlnets/tiny-sdxl-control-union/`` from the tiny SDXL UNet with ``from_unet``; its weights are
drawn at random, including the zero-initialised output convolutions and projection a real one starts training with
(with zeros it would change nothing). Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from devtools.tiny_controlnet import CONDITIONING_CHANNELS, SEED_OFFSET, ZERO_CONV_STD

UNION_SEED = 200  # apart from tiny_controlnet.py's seeds
TRANSFORMER_HEADS = 2  # real: 8
CONTROL_TYPES = 8  # as xinsir's "promax" Union ControlNet (tile and inpaint too); the first one has 6


def write_tiny_controlnet_union(unet, out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/controlnets/tiny-sdxl-control-union/ from the tiny SDXL ``unet``; {"controlnet-sdxl-union": folder}."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed * 1000 + SEED_OFFSET * 10 + UNION_SEED)
    layout = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
                                            load_weights_from_unet=False).config
    width = unet.config.block_out_channels[0]  # the control-type transformer at the UNet's width (real: 320)
    layout = {key: value for key, value in layout.items() if not key.startswith("_")}
    model = ControlNetUnionModel.from_config({**layout, "num_trans_channel": width, "num_proj_channel": width,
                                              "num_trans_head": TRANSFORMER_HEADS, "num_control_type": CONTROL_TYPES})
    with torch.no_grad():
        outputs = [model.controlnet_cond_embedding.conv_out, model.controlnet_mid_block, model.spatial_ch_projs,
                   *model.controlnet_down_blocks]
        for layer in outputs:
            layer.weight.normal_(0.0, ZERO_CONV_STD)
            layer.bias.normal_(0.0, ZERO_CONV_STD)
    folder = Path(out) / "controlnets" / "tiny-sdxl-control-union"
    model.save_pretrained(folder, safe_serialization=True)
    return {"controlnet-sdxl-union": folder}
