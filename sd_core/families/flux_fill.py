"""FLUX.1 Fill: a FLUX transformer that inpaints (and outpaints), conditioned on the masked image and the mask.

Its transformer takes the packed noise latents, the masked image's latents and the mask (one channel per pixel of a
VAE cell) side by side: ``in_channels`` = 4 x latent channels x 2 + 4 x vae_scale_factor^2 (384 for FLUX.1 Fill dev:
64 + 64 + 256), so it cannot run FluxPipeline. Every request on it runs ``FluxFillPipeline`` and must inpaint: an
image and a mask, or ``outpaint``; txt2img and img2img are refused (FluxFillPipeline needs the image and the mask).
Everything else is FLUX's (prompts, guidance embedding at ~30, Euler, single files, refusals).
"""

import dataclasses

from . import flux

FAMILY = dataclasses.replace(
    flux.FAMILY,
    name="flux-fill",
    # the pool loads the "txt2img" class: FluxFillPipeline under every mode; only inpaint requests run (`modes`)
    pipelines={"txt2img": "FluxFillPipeline", "img2img": "FluxFillPipeline", "inpaint": "FluxFillPipeline"},
    modes=("inpaint",),
    guidance_scale=30.0,  # black-forest-labs/FLUX.1-Fill-dev's model card
    # A Fill checkpoint has FLUX's tensor names: FLUX's detect() finds it, its variant() (the input width) says Fill
    checkpoint_prefixes=(),
)
