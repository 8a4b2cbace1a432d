"""FLUX.1 (schnell, dev and fine-tunes): a flow-matching transformer with CLIP-L + T5-XXL text encoders.

Guidance is distilled: ``guidance_scale`` is FLUX's guidance embedding (dev; schnell ignores it), no classifier-free
guidance, so there is no negative prompt (refused when not empty). The one sampler is flow-matching Euler
(``FlowMatchEulerDiscreteScheduler``, built from the model's own scheduler config: schnell's fixed shift, dev's
dynamic shifting); A1111's ``Euler`` (and its ``Automatic`` schedule) name it, every other sampler is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import MAX_SEQUENCE_LENGTH
from .flow_match import EULER, FlowMatchFamily


class FluxFamily(FlowMatchFamily):
    """FLUX.1: prompt and prompt_2 (T5) from the one prompt, the T5 token count, flow-matching Euler only."""

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """The prompt for both encoders (diffusers' prompt_2 = prompt when None); negative prompts never get here
        (sd_core/family_features.py refuses them)."""
        return {"prompt": prompts}

    def call_kwargs(self, job) -> dict[str, Any]:
        kwargs = super().call_kwargs(job)  # the T5 token count
        if job.mode == "img2img":  # FluxImg2ImgPipeline defaults to 1024x1024, not the init image's size
            kwargs.update(width=job.width, height=job.height)
        return kwargs

    def detect(self, keys: Iterable[str]) -> bool:
        """BFL's layout (``double_blocks.``), bare or under ``model.diffusion_model.`` (ComfyUI / A1111 Forge)."""
        return any(key.startswith(self.checkpoint_prefixes) for key in keys)


FAMILY = FluxFamily(
    name="flux",
    pipelines={
        "txt2img": "FluxPipeline",
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    },
    width=1024, height=1024, num_inference_steps=28, guidance_scale=3.5,
    checkpoint_prefixes=("double_blocks.", "model.diffusion_model.double_blocks."),
    clip_skip=False,
    parameters=16_900_000_000,  # transformer 11.9B + T5-XXL 4.7B + CLIP-L 123M + VAE 84M
    embedding_keys=(),
    features=frozenset({MAX_SEQUENCE_LENGTH}),
    denoiser="transformer",
    cuda_dtype="bfloat16",  # FLUX overflows in fp16
    scheduler=EULER,
    max_sequence_length=512,  # FLUX.1-dev's; schnell's manifests say 256
)
