"""A tiny random-weight SD3 ControlNet (diffusers folder) made from the tiny SD3 transformer's config.

Written under ``DIR/controlnets/tiny-sd3-control/``: ``SD3ControlNetModel.from_transformer`` with one joint block and
no extra conditioning channel (InstantX's SD3 ControlNets' layout: the control image, VAE-encoded, is its only
input). Its weights are drawn at random, the zero-initialised input patch embedding and output projections a real one
starts training with too (with zeros it would change nothing). Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEED_OFFSET = 47  # after devtools/tiny_sd3.py's SEED_BASE + its components
ZERO_STD = 0.5  # the weight scale of the (normally zero) layers: a visible effect on the tiny model


def write_tiny_sd3_controlnet(transformer, out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/controlnets/tiny-sd3-control/ from ``transformer``'s config; {"controlnet-sd3": folder}."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed * 100 + SEED_OFFSET)
    model = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0,
                                                load_weights_from_transformer=False)
    with torch.no_grad():
        for layer in (model.pos_embed_input.proj, *model.controlnet_blocks):
            layer.weight.normal_(0.0, ZERO_STD / layer.weight[0].numel() ** 0.5)
            layer.bias.normal_(0.0, ZERO_STD)
    folder = Path(out) / "controlnets" / "tiny-sd3-control"
    model.save_pretrained(folder, safe_serialization=True)
    return {"controlnet-sd3": folder}
