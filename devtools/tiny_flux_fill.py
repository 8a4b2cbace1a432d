"""A tiny random-weight FLUX.1 Fill model (FluxFillPipeline folder) on the tiny FLUX model's encoders and VAE, offline.

Layout written under ``DIR`` (called by devtools/tiny_flux.py's ``write_tiny_flux``):

    DIR/tiny-flux-fill/diffusers/   complete diffusers FluxFillPipeline folder (safetensors weights)

The Fill transformer sees three packed inputs side by side: the noise latents and the masked image's latents
(4 x latent channels each: 2x2 patches) and the mask (one channel per pixel of a VAE cell, vae_scale_factor^2 = 64,
in 2x2 patches: 256). FLUX.1 Fill dev: 64 + 64 + 256 = 384 in, 64 out; here 16 + 16 + 256 = 288 in, 16 out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import FluxFillPipeline, FluxTransformer2DModel

from devtools.tiny_flux import LATENT_CHANNELS, SEED_OFFSETS, TRANSFORMER, VAE, save_flux_folder

VAE_SCALE_FACTOR = 2 ** (len(VAE["block_out_channels"]) - 1)  # 8, as FluxFillPipeline computes it
PACKED_LATENTS = 4 * LATENT_CHANNELS
FILL_TRANSFORMER = {**TRANSFORMER, "in_channels": 2 * PACKED_LATENTS + 4 * VAE_SCALE_FACTOR ** 2,
                    "out_channels": PACKED_LATENTS}
SEED_OFFSET = SEED_OFFSETS["transformer"] + 10


def write_tiny_flux_fill(out: Path, seed: int, base, tokenizer: Path) -> dict[str, Path]:
    """Write tiny-flux-fill (diffusers folder) under ``out``, on the scheduler, encoders and VAE of ``base`` (the tiny
    FluxPipeline of the same seed) and the CLIP tokenizer files in ``tokenizer``; return its path."""
    root = out / "tiny-flux-fill"
    folder = root / "diffusers"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(seed * 100 + SEED_OFFSET)
    transformer = FluxTransformer2DModel(**FILL_TRANSFORMER)
    pipe = FluxFillPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                            tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                            tokenizer_2=base.tokenizer_2, transformer=transformer)
    save_flux_folder(pipe, folder, tokenizer)
    return {"tiny-flux-fill": root}
