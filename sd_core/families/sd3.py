"""Stable Diffusion 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L, CLIP-G, optional T5), flow matching."""

from __future__ import annotations

from typing import Any

from .base import UNET_FEATURES, ModelFamily

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' default T5 prompt length for SD3
FLOW_MATCH_SCHEDULERS = ("Euler",)  # A1111's Euler on a flow-matching model: diffusers' FlowMatchEulerDiscreteScheduler


class SD3Family(ModelFamily):
    """SD3's hooks: one prompt for all three encoders, its T5 prompt length, the flow-matching Euler scheduler.

    diffusers' FlowMatchEulerDiscreteScheduler also takes Karras / exponential / beta sigmas, but computes them from
    its own twice-shifted last sigma, not from the model's sigma range as A1111 does: not the same schedule, so only
    the plain (Uniform) Euler is offered.
    """

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """The prompt for CLIP-L, CLIP-G and T5 alike (as diffusers does when prompt_2/prompt_3 are empty); SD3 has
        no zeroed empty negative, so an empty negative prompt is encoded as "" (as diffusers' None is)."""
        return {"prompt": prompts, "prompt_2": prompts, "prompt_3": prompts, "negative_prompt": negative_prompts,
                "negative_prompt_2": negative_prompts, "negative_prompt_3": negative_prompts}

    def call_kwargs(self, request) -> dict[str, Any]:
        length = request.max_sequence_length
        return {"max_sequence_length": DEFAULT_MAX_SEQUENCE_LENGTH if length is None else length}

    def infotext_fields(self, request) -> dict[str, Any]:
        """``Max sequence length: N`` when the request set it (not an A1111 field: A1111 has no such setting)."""
        length = request.max_sequence_length
        return {} if length is None else {"Max sequence length": length}

    def schedulers(self) -> tuple[str, ...]:
        return FLOW_MATCH_SCHEDULERS

    def build_scheduler(self, name: str, base_config: dict[str, Any]):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name not in FLOW_MATCH_SCHEDULERS:  # engine.resolve refuses it first; never build another class
            raise ValueError(f"{name!r} is not a flow-matching scheduler")
        return FlowMatchEulerDiscreteScheduler.from_config(base_config)


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
    scheduler="Euler",
    # T5-XXL (4.7B parameters) is optional: without it diffusers conditions on zeros in its place (less prompt
    # adherence, much less memory)
    optional_components={"text_encoder_3": ("text_encoder_3", "tokenizer_3")},
    capabilities=(UNET_FEATURES | {"max_sequence_length"}) - {
        "prompt_syntax", "embeddings", "hires", "tiling", "vae", "ip_adapter"},
)
