"""Stable Diffusion 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L, CLIP-G, optional T5), flow matching."""

from __future__ import annotations

from typing import Any

from .base import (
    EMBEDDINGS,
    EXPLICIT_SIGMAS,
    HIRES,
    IP_ADAPTER,
    LATENT_FILL,
    LATENT_RESIZE,
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

    def controlnet_image_kwarg(self, mode: str) -> str:
        return "control_image"

    def controlnet_mismatch(self, denoiser: Any, config: dict[str, Any]) -> tuple[str, str] | None:
        """An SD3 ControlNet fits when its width, patching, latent channels and pooled-text width are the MMDiT's
        (and, when it has its own text embedder, the joint-attention width); one with extra conditioning channels
        (Alimama's inpainting ControlNet, for diffusers' inpainting ControlNet pipeline) does not run here."""
        kind = config.get("_class_name") or self.controlnet_model  # (a model made in memory: no class name)
        if kind != self.controlnet_model:
            return f"{kind}, not an SD3 ControlNet", f"an MMDiT, {self.controlnet_model}"
        if config.get("extra_conditioning_channels"):
            return ("an SD3 inpainting ControlNet (extra conditioning channels), which needs diffusers' inpainting "
                    "ControlNet pipeline, not run here", "txt2img ControlNets only")
        keys = ("patch_size", "in_channels", "pooled_projection_dim")
        theirs = {k: config.get(k) for k in keys}
        ours = {k: denoiser.get(k) for k in keys}
        theirs["width"] = (config.get("num_attention_heads") or 0) * (config.get("attention_head_dim") or 0)
        ours["width"] = denoiser.num_attention_heads * denoiser.attention_head_dim
        if config.get("joint_attention_dim") is not None:
            theirs["joint_attention_dim"] = config["joint_attention_dim"]
            ours["joint_attention_dim"] = denoiser.joint_attention_dim
        if theirs == ours:
            return None
        return (", ".join(f"{k} {v}" for k, v in theirs.items() if v != ours[k]),
                ", ".join(f"{k} {v}" for k, v in ours.items() if v != theirs[k]))

    def prepare_controlnets(self, pipe, modules: list) -> None:
        """SD3.5 Large's ControlNets have no patch embedding of their own: they take the transformer's, as diffusers'
        pipeline constructor gives them (also done here for ControlNets set on an existing pipeline, and again when
        a loaded ControlNet moves to another model)."""
        for module in modules:
            if getattr(module.config, "use_pos_embed", True) is False and (
                    module.pos_embed is None or getattr(module, "_pos_embed_of", None) != id(pipe.transformer)):
                pos_embed = module._get_pos_embed_from_transformer(pipe.transformer)
                module.pos_embed = pos_embed.to(dtype=module.dtype, device=module.device)
                module._pos_embed_of = id(pipe.transformer)


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
    # negative prompts, variation seeds (noise in the transformer's latent shape) and ControlNet (txt2img) run; A1111
    # prompt syntax (CLIP weighting), embeddings, hires, tiling, alternate VAEs, IP-Adapter, latent fills and the
    # latent resize (16-channel latents) do not
    features=(SD_FEATURES | {MAX_SEQUENCE_LENGTH, EXPLICIT_SIGMAS}) - {
        PROMPT_SYNTAX, EMBEDDINGS, HIRES, TILING, VAE_OVERRIDE, IP_ADAPTER, LATENT_FILL, LATENT_RESIZE},
    # InstantX's / SAI's SD3 ControlNets, txt2img only: diffusers has no SD3 ControlNet img2img pipeline, and its
    # inpainting one runs Alimama's inpainting ControlNet only (the masked image as the control image)
    controlnet_pipelines={"txt2img": "StableDiffusion3ControlNetPipeline"},
    controlnet_model="SD3ControlNetModel",
    multi_controlnet_model="SD3MultiControlNetModel",
    # balanced only: soft injection ("My prompt is more important") is defined on UNet residual blocks, and
    # diffusers' SD3 ControlNet pipeline has no guess_mode ("ControlNet is more important")
    controlnet_modes=("balanced",),
    denoiser="transformer",
    scheduler=EULER,
    max_sequence_length=256,  # diffusers' default T5 prompt length for SD3
    # T5-XXL (4.7B parameters) is optional: without it diffusers conditions on zeros in its place (less prompt
    # adherence, much less memory)
    optional_components={"text_encoder_3": ("text_encoder_3", "tokenizer_3")},
)
