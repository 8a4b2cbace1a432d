"""FLUX.1 (schnell, dev and fine-tunes): a flow-matching transformer with CLIP-L + T5-XXL text encoders.

Guidance is distilled: ``guidance_scale`` is FLUX's guidance embedding (dev; schnell ignores it), no classifier-free
guidance, so there is no negative prompt (refused when not empty). The one sampler is flow-matching Euler
(``FlowMatchEulerDiscreteScheduler``, built from the model's own scheduler config: schnell's fixed shift, dev's
dynamic shifting); A1111's ``Euler`` (and its ``Automatic`` schedule) name it, every other sampler is refused.
A single-file FLUX model is its transformer alone (``load_single_file``), the rest from the base model's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ManifestError, quote
from .base import EXPLICIT_SIGMAS, MAX_SEQUENCE_LENGTH
from .flow_match import EULER, FlowMatchFamily

FILL_MASK_CHANNELS = 256  # FLUX.1 Fill's mask input: 8x8 pixels per latent cell, in 2x2 patches


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

    def load_single_file(self, cls, weights: str, config: str, **kwargs):
        """A transformer checkpoint, as FLUX fine-tunes ship (BFL's keys, bare or under ComfyUI's
        ``model.diffusion_model.``, or diffusers' own), converted by diffusers' ``FluxTransformer2DModel.
        from_single_file`` with the config of ``config``/transformer; the VAE, text encoders, tokenizers and scheduler
        are those of ``config``: the base model's diffusers folder (its transformer weights may be left out), even
        when the file holds others too. Only safetensors weights are read from the folder."""
        from diffusers import FluxTransformer2DModel

        try:
            transformer = FluxTransformer2DModel.from_single_file(weights, config=config, subfolder="transformer",
                                                                  **kwargs)
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:  # the converter on a file it cannot map
            raise ManifestError(f"{quote(Path(weights).name)} is not a FLUX.1 transformer checkpoint that diffusers "
                                "can load with its config folder's transformer/config.json "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                                ) from None
        return cls.from_pretrained(config, transformer=transformer, use_safetensors=True, **kwargs)

    def variant(self, shapes: dict[str, list[int]]) -> str:
        """flux or flux-fill, from the transformer's input and output widths (``img_in`` / ``x_embedder``, the final
        layer): FLUX.1 takes what it returns (64 channels: 2x2 patches of 16 latent channels); Fill takes twice that
        plus 256 (the masked image's latents and the 8x8 mask beside the noise: 384). Others (FLUX.1 Canny / Depth:
        twice) are refused."""
        width_in = _shape(shapes, "img_in.weight", "x_embedder.weight")
        width_out = _shape(shapes, "final_layer.linear.weight", "proj_out.weight")
        if len(width_in) != 2 or len(width_out) != 2:
            return self.name  # a partial header: the names said FLUX, loading checks the rest
        channels_in, channels_out = width_in[1], width_out[0]
        if channels_in == channels_out:
            return self.name
        if channels_in == 2 * channels_out + FILL_MASK_CHANNELS:
            return "flux-fill"
        raise ValueError(f"a FLUX transformer taking {channels_in} input channels for {channels_out} output ones is "
                         f"neither FLUX.1 ({channels_out}) nor FLUX.1 Fill ({2 * channels_out + FILL_MASK_CHANNELS}); "
                         "other FLUX variants (Canny, Depth, Redux) do not run on this worker")


def _shape(shapes: dict[str, list[int]], *names: str) -> list[int]:
    """The shape of the first of ``names`` in a header, bare or under ComfyUI's ``model.diffusion_model.``."""
    for name in names:
        for key in (name, f"model.diffusion_model.{name}"):
            if isinstance(shapes.get(key), list):
                return shapes[key]
    return []


FAMILY = FluxFamily(
    name="flux",
    pipelines={
        "txt2img": "FluxPipeline",
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    },
    width=1024, height=1024, num_inference_steps=28, guidance_scale=3.5,
    # BFL's layout, bare or under ComfyUI's / A1111 Forge's model.diffusion_model., or diffusers' own transformer keys
    checkpoint_prefixes=("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks."),
    clip_skip=False,
    parameters=16_900_000_000,  # transformer 11.9B + T5-XXL 4.7B + CLIP-L 123M + VAE 84M
    embedding_keys=(),
    features=frozenset({MAX_SEQUENCE_LENGTH, EXPLICIT_SIGMAS}),
    denoiser="transformer",
    cuda_dtype="bfloat16",  # FLUX overflows in fp16
    scheduler=EULER,
    max_sequence_length=512,  # FLUX.1-dev's; schnell's manifests say 256
)
