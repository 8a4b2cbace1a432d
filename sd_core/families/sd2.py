"""Stable Diffusion 2.x: the SD1 pipelines with an OpenCLIP ViT-H text encoder, 768x768."""

from .base import ModelFamily
from .sd15 import SD15_PIPELINES

FAMILY = ModelFamily(
    name="sd2",
    pipelines=SD15_PIPELINES,
    width=768, height=768, num_inference_steps=30, guidance_scale=7.5,
    checkpoint_prefixes=("cond_stage_model.model.",),  # OpenCLIP layout under cond_stage_model
    parameters=1_300_000_000,  # UNet 865M + OpenCLIP-H 354M + VAE 84M
)
