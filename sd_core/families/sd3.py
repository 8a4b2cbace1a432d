"""Stable Diffusion 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L, CLIP-G, optional T5), flow matching."""

from __future__ import annotations

from typing import Any

from .base import (
    CONTROLNET,
    EMBEDDINGS,
    HIRES,
    IP_ADAPTER,
    LATENT_FILL,
    MAX_SEQUENCE_LENGTH,
    PROMPT_SYNTAX,
    SD_FEATURES,
    TILING,
    VAE_OVERRIDE,
)
from .flow_match import EULER, FlowMatchFamily


class SD3Family(FlowMatchFamily):
    """SD3's hooks: one prompt for all three encoders (the T5 token count and flow-matching Euler are the base's)."""

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """The prompt for CLIP-L, CLIP-G and T5 alike (as diffusers does when prompt_2/prompt_3 are empty); SD3 has
        no zeroed empty negative, so an empty negative prompt is encoded as "" (as diffusers' None is)."""
        return {"prompt": prompts, "prompt_2": prompts, "prompt_3": prompts, "negative_prompt": negative_prompts,
                "negative_prompt_2": negative_prompts, "negative_prompt_3": negative_prompts}


FAMILY = SD3Family(
    name="sd3",
    pipelines={
        "txt2img": "StableDiffusion3Pipeline",
        "img2img": "StableDiffusion3Img2ImgPipeline",
        "inpaint": "StableDiffusion3InpaintPipeline",
    },
    width=1024, height=1024, num_inference_steps=28, guidance_scale=7.0,  # diffusers' SD3 defaults
    # SD3 / SD3.5 single files (Comfy/SAI layout): the MMDiT's joint blocks under model.diffusion_model
    checkpoint_prefixes=("model.diffusion_model.joint_blocks.",),
    parameters=8_000_000_000,  # SD3.5 Large: MMDiT 8.1B (medium 2.5B) + CLIP-L 123M + CLIP-G 695M + T5-XXL 4.7B
    clip_skip=False,  # no A1111 clip skip for SD3 (diffusers' clip_skip is CLIP-only and not A1111's)
    embedding_keys=(),  # no A1111 textual inversions for SD3
    # negative prompts and variation seeds (noise in the transformer's latent shape) run; A1111 prompt syntax (CLIP
    # weighting), embeddings, hires, tiling, alternate VAEs, ControlNet, IP-Adapter and latent fills do not
    features=(SD_FEATURES | {MAX_SEQUENCE_LENGTH}) - {
        PROMPT_SYNTAX, EMBEDDINGS, HIRES, TILING, VAE_OVERRIDE, CONTROLNET, IP_ADAPTER, LATENT_FILL},
    denoiser="transformer",
    scheduler=EULER,
    max_sequence_length=256,  # diffusers' default T5 prompt length for SD3
    # T5-XXL (4.7B parameters) is optional: without it diffusers conditions on zeros in its place (less prompt
    # adherence, much less memory)
    optional_components={"text_encoder_3": ("text_encoder_3", "tokenizer_3")},
)
