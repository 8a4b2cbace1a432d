"""Stable Diffusion XL: two text encoders (CLIP ViT-L + OpenCLIP bigG), 1024x1024."""

from ..schedulers import AYS_SDXL
from .base import ModelFamily

FAMILY = ModelFamily(
    name="sdxl",
    pipelines={
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    controlnet_pipelines={
        "txt2img": "StableDiffusionXLControlNetPipeline",
        "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
    },
    width=1024, height=1024, num_inference_steps=30, guidance_scale=7.0,
    checkpoint_prefixes=("conditioner.embedders.",),  # SGM layout: both encoders under conditioner.embedders
    clip_skip=False,  # A1111 ignores CLIP_stop_at_last_layers for this family
    parameters=3_500_000_000,  # UNet 2.6B + CLIP-L 123M + OpenCLIP-bigG 695M + VAE 84M
    ays_sigmas=AYS_SDXL,
    embedding_keys=("clip_l", "clip_g"),  # A1111's SDXL embeddings: one tensor per text encoder
)
