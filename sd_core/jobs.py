"""A generation job: what each stage of Engine.generate adds to one request, and the callbacks it carries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .controlnet import ResolvedControl
from .embeddings import ResolvedEmbedding
from .ip_adapter import ResolvedIpAdapter
from .lora import ResolvedLora
from .manifests import ModelManifest
from .prompt_encoding import JobPrompts
from .schema import GenerationRequest
from .vae import ResolvedVae

if TYPE_CHECKING:
    from .hires import HiresPlan

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
    # The negative prompt as the user gave it (None: request.negative_prompt), and the embeddings the prompts use:
    # request.prompt / negative_prompt hold their internal tokens instead of their names.
    negative_prompt: str | None = None
    embeddings: tuple[ResolvedEmbedding, ...] = ()
    nsfw: list[bool] | None = None  # the safety checker's flag per image (None: not checked)
    subseeds: list[int] | None = None  # variation seeds, one per image (None: the plain seeds' noise)
    vae: ResolvedVae | None = None  # the alternate VAE chosen (None: the model's own)
    hires: HiresPlan | None = None  # the hires fix's second pass, run by stage 6 (sd_core/hires.py)
    pass_mode: str | None = None  # a pipeline mode other than the request's: "img2img" for a hires second pass
    inpaint: Any = None  # sd_core.inpainting.InpaintPlan: the overlay post-pass (None: none)
    # extra keyword arguments of the stage-5 pipeline call, for a post-pass that continues it (the refiner:
    # output_type="latent", denoising_end); jobs with different ones never share a batch
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    refiner: ModelManifest | None = None  # the refiner model of a refined job (sd_core/refiner.py), else None
    prompts: JobPrompts | None = None  # the prompts' A1111 syntax, parsed (None: plain text, as before)
    controls: tuple[ResolvedControl, ...] = ()  # ControlNet units with a scale above 0
    ip_adapter: ResolvedIpAdapter | None = None  # image prompt: adapter, scale, reference images (None: none)

    @property
    def mode(self) -> str:
        """The pipeline this job runs: txt2img, img2img or inpaint."""
        return self.pass_mode or self.request.mode

    @property
    def output_type(self) -> str:
        """What the pipeline call returns: latents for a hires fix upscaled in latent space, else images."""
        return "latent" if self.hires is not None and self.hires.latent else "pil"

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one denoising call; img2img/inpaint (own init images) and
        jobs with ControlNet units never batch.

        Plain and A1111-syntax prompts batch apart; prompt editing never batches (``JobPrompts.batch_key``). Jobs
        with an IP-Adapter never batch (each has its own reference images). Empty and non-empty negative prompts
        never share a batch: an all-empty batch is run with no negative prompt
        (SDXL then uses a zero negative embedding, as diffusers and A1111 do; see ``ModelFamily.prompt_kwargs``).
        Embeddings are not part of the key: they are tokens in the prompts, and the denoiser loads the union of a
        batch's embeddings.
        """
        r = self.request
        prompts = self.prompts.batch_key if self.prompts is not None else ("plain",)
        # own init images, own control images, own reference images; prompt editing / alternation: never batched
        if self.mode != "txt2img" or self.controls or self.ip_adapter is not None or prompts is None:
            return None
        return (r.model, self.width, self.height, r.num_inference_steps, r.scheduler, r.guidance_scale,
                tuple(lora.key for lora in self.loras), not r.negative_prompt, r.clip_skip, r.eta, r.tiling,
                self.vae.key if self.vae else None, self.output_type, tuple(sorted(self.pipe_kwargs.items())), prompts,
                r.max_sequence_length, tuple(r.sigmas or ()))

    @property
    def steps_run(self) -> int:
        """Denoising steps actually run: img2img/inpaint skip the first (1 - strength) of the schedule; a hires fix
        adds its second pass."""
        r = self.request
        if self.mode == "txt2img":
            return r.num_inference_steps + (self.hires.steps if self.hires is not None else 0)
        return max(1, int(r.num_inference_steps * r.strength))
