"""A generation job: what each stage of Engine.generate adds to one request, and the callbacks it carries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .ip_adapter import ResolvedIpAdapter
from .lora import ResolvedLora
from .manifests import ModelManifest
from .schema import GenerationRequest

StepCallback = Callable[[int, int], None]  # (steps done, steps total)
CancelCheck = Callable[[], bool]


@dataclass
class Job:
    """A validated request ready for the GPU: defaults filled, input images decoded, seeds chosen."""

    request: GenerationRequest
    manifest: ModelManifest
    width: int
    height: int
    seeds: list[int]
    image: Any = None
    mask: Any = None
    on_step: StepCallback | None = None
    should_cancel: CancelCheck | None = None
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    loras: tuple[ResolvedLora, ...] = ()  # fetched LoRAs with their scales (request field + prompt tags)
    prompt: str = ""  # the prompt as the user gave it, <lora:...> tags included (request.prompt has them stripped)
    nsfw: list[bool] | None = None  # the safety checker's flag per image (None: not checked)
    subseeds: list[int] | None = None  # variation seeds, one per image (None: the plain seeds' noise)
    ip_adapter: ResolvedIpAdapter | None = None  # image prompt: adapter, scale, reference images (None: none)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one denoising call; img2img/inpaint (own init images) never batch.

        Jobs with an IP-Adapter never batch (each has its own reference images). Empty and non-empty negative
        prompts never share a batch: an all-empty batch is run with no negative prompt
        (SDXL then uses a zero negative embedding, as diffusers and A1111 do; see ``ModelFamily.prompt_kwargs``).
        """
        r = self.request
        if r.mode != "txt2img" or self.ip_adapter is not None:
            return None
        return (r.model, self.width, self.height, r.num_inference_steps, r.scheduler, r.guidance_scale,
                tuple(lora.key for lora in self.loras), not r.negative_prompt, r.clip_skip, r.eta, r.tiling)

    @property
    def steps_run(self) -> int:
        """Denoising steps actually run: img2img/inpaint skip the first (1 - strength) of the schedule."""
        r = self.request
        if r.mode == "txt2img":
            return r.num_inference_steps
        return max(1, int(r.num_inference_steps * r.strength))
