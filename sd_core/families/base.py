"""The ModelFamily type: everything one model architecture must say, in one place per architecture."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..schedulers import SCHEDULER_NAMES


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One architecture (a manifest's ``architecture``): its diffusers pipelines, defaults, prompt handling, the
    schedulers it runs, its single-file checkpoint signature and its rough memory need.

    Fields are data; the methods are the hooks a family with other needs (SD3's three prompts, FLUX's missing
    negative prompt) overrides in a subclass.
    """

    name: str
    # diffusers pipeline class per mode; img2img/inpaint are built from the txt2img pipeline with from_pipe
    pipelines: dict[str, str]
    width: int  # defaults for a request that leaves them empty (a manifest's `defaults` override them)
    height: int
    num_inference_steps: int
    guidance_scale: float
    # a single-file checkpoint of this family has a key starting with one of these (its text encoder's layout)
    checkpoint_prefixes: tuple[str, ...]
    # rough parameter count of the full pipeline (UNet + text encoders + VAE): memory_bytes() estimates from it
    parameters: int
    # the text-encoder layer the pipeline conditions on, counted from the end: 1 = the last (SD1.x/2.x), 2 = the
    # penultimate (SDXL); diffusers' clip_skip counts further back from it
    conditioning_layer: int = 1

    @property
    def defaults(self) -> dict[str, Any]:
        """The request defaults manifests start from."""
        return {"width": self.width, "height": self.height, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale}

    def pipeline_class(self, mode: str):
        """The diffusers pipeline class for ``mode`` (importing it costs seconds the first time)."""
        import diffusers

        return getattr(diffusers, self.pipelines[mode])

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """A batch's prompts (one per image) as pipeline keyword arguments.

        The negative prompt is None when all are empty: SDXL (force_zeros_for_empty_prompt) then zeros the negative
        embedding, as bare diffusers and A1111 do; SD1.x/2.x encode "" either way. Jobs with empty and non-empty
        negative prompts never share a batch (``Job.batch_key``).
        """
        return {"prompt": prompts, "negative_prompt": negative_prompts if any(negative_prompts) else None}

    def enable_clip_skip(self, pipe) -> tuple[int, int] | None:
        """Ready a loaded pipeline for diffusers' ``clip_skip``; (its text encoders' depth, the most layers a request
        may skip: at least one stays; with two encoders the shallower bounds it). None: this family has no clip skip.
        """
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        encoders = [encoder for encoder in encoders if encoder is not None]
        for encoder in encoders:
            _expose_text_model(encoder)
        depth = min(encoder.config.num_hidden_layers for encoder in encoders)
        return depth, depth - self.conditioning_layer

    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names this family can run (every one today; flow-matching families will differ)."""
        return SCHEDULER_NAMES

    def detect(self, keys: Iterable[str]) -> bool:
        """Whether a single-file checkpoint with these state-dict keys belongs to this family."""
        return any(key.startswith(self.checkpoint_prefixes) for key in keys)

    def memory_bytes(self, bytes_per_parameter: int = 2) -> int:
        """A rough estimate of the loaded pipeline's weights (fp16 by default); not used for decisions yet (the
        pipeline pool measures loaded models), meant for placement and cache planning."""
        return self.parameters * bytes_per_parameter


def _expose_text_model(encoder) -> None:
    """diffusers' SD1.x/2.x pipelines apply clip skip's final layer norm as ``text_encoder.text_model.final_layer_norm``
    (diffusers issue #14124), which transformers >= 5.6 removed from ``CLIPTextModel`` (now flat, with
    ``final_layer_norm`` on the model itself). Give such an encoder that path back, to its own layer norm: a plain
    attribute, not a registered submodule, so weights, devices and state dicts are unchanged."""
    if hasattr(encoder, "text_model") or not hasattr(encoder, "final_layer_norm"):
        return
    object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
