"""Stable Diffusion 1.x (SD1.5 and its fine-tunes): CLIP ViT-L text encoder, 512x512."""

from .base import ModelFamily

FAMILY = ModelFamily(
    name="sd15",
    pipelines={
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    controlnet_pipelines={
        "txt2img": "StableDiffusionControlNetPipeline",
        "img2img": "StableDiffusionControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionControlNetInpaintPipeline",
    },
    width=512, height=512, num_inference_steps=30, guidance_scale=7.5,
    checkpoint_prefixes=("cond_stage_model.transformer.",),  # CompVis layout: HF CLIP under cond_stage_model
    parameters=1_070_000_000,  # UNet 860M + CLIP-L 123M + VAE 84M
)
