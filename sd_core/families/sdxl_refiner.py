"""The SDXL refiner: an img2img-only UNet on OpenCLIP bigG (no CLIP-L), aesthetic-score conditioning; refines sdxl."""

import dataclasses

from . import sdxl

FAMILY = dataclasses.replace(
    sdxl.FAMILY,
    name="sdxl-refiner",
    # The refiner has one pipeline: the img2img one, under every mode (the pool loads the "txt2img" class). Requests
    # never run it as their model: it is the second pass of an sdxl request (sd_core/refiner.py).
    pipelines={
        "txt2img": "StableDiffusionXLImg2ImgPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    # SGM refiner checkpoints hold bigG alone under conditioner.embedders.0 (the base's CLIP-L sits there)
    checkpoint_prefixes=("conditioner.embedders.0.model.",),
    parameters=3_100_000_000,  # UNet 2.3B + OpenCLIP-bigG 695M + VAE 84M
    refines=("sdxl",),
)
