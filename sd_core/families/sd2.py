"""Stable Diffusion 2.x: the SD1 pipelines with an OpenCLIP ViT-H text encoder, 768x768."""

import dataclasses

from . import sd15

FAMILY = dataclasses.replace(
    sd15.FAMILY,
    name="sd2",
    width=768, height=768,
    checkpoint_prefixes=("cond_stage_model.model.",),  # OpenCLIP layout under cond_stage_model
    clip_skip=False,  # A1111 ignores CLIP_stop_at_last_layers for this family
    parameters=1_300_000_000,  # UNet 865M + OpenCLIP-H 354M + VAE 84M
)
