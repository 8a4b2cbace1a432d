"""The ModelFamily type: everything one model architecture must say, in one place per architecture."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest, quote
from ..limits import CONTROL_MODES
from ..schedulers import AYS_SD15, SCHEDULER_NAMES

# Engine features a family may lack (``ModelFamily.features``): what a request using one asks of the model. A family
# without one refuses such a request clearly (sd_core/family_features.py) instead of failing deep in diffusers.
NEGATIVE_PROMPT = "negative_prompt"  # a non-empty negative prompt (classifier-free guidance on it)
PROMPT_SYNTAX = "prompt_syntax"  # A1111 weights, BREAK, prompt editing (CLIP embeddings, sd_core/prompt_encoding.py)
VARIATION_SEEDS = "variation_seeds"  # subseed / subseed_strength (initial noise in the denoiser's latent shape)
HIRES = "hires"  # the hires fix's second pass
TILING = "tiling"  # circular padding of the UNet's and VAE's convolutions
EMBEDDINGS = "embeddings"  # textual inversion (A1111 files, one tensor per CLIP encoder)
CONTROLNET = "controlnet"  # also needs the family's controlnet_pipelines
IP_ADAPTER = "ip_adapter"
VAE_OVERRIDE = "vae"  # an alternate VAE from the manifest
LATENT_FILL = "latent_fill"  # A1111's inpainting_fill latent noise / latent nothing (4-channel latents)
MAX_SEQUENCE_LENGTH = "max_sequence_length"  # a T5 text encoder whose token count a request may set
EXPLICIT_SIGMAS = "sigmas"  # a request's own noise schedule (ModelFamily.sigma_scheduler)
LATENT_RESIZE = "latent_resize"  # resize_mode latent: the init image's latent resized (latent_resize.py)
SD_FEATURES = frozenset({NEGATIVE_PROMPT, PROMPT_SYNTAX, VARIATION_SEEDS, HIRES, TILING, EMBEDDINGS, CONTROLNET,
                         IP_ADAPTER, VAE_OVERRIDE, LATENT_FILL, LATENT_RESIZE, EXPLICIT_SIGMAS})
EULER = "Euler"  # the canonical name of A1111's Euler with its Automatic (Uniform) schedule


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One architecture (a manifest's ``architecture``): its diffusers pipelines, defaults, prompt handling, the
    schedulers it runs, its single-file checkpoint signature and its rough memory need.

    Fields are data; the methods are the hooks a family with other needs (SD3's three prompts, FLUX's missing
    negative prompt, flow-matching schedulers) overrides in a subclass.
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
    # whether requests may skip CLIP layers (clip_skip, A1111's CLIP_stop_at_last_layers): A1111 applies it to SD1.x
    # only (it ignores it for SD2's OpenCLIP and, by default, for SDXL), so other families refuse it
    clip_skip: bool = True
    # Align Your Steps' sigmas for this architecture (A1111 uses the SD 1.5 table for every non-SDXL model)
    ays_sigmas: tuple[float, ...] = AYS_SD15
    # a refiner family: the architectures whose images it refines (sd_core/refiner.py); () for a model of its own
    refines: tuple[str, ...] = ()
    # diffusers ControlNet pipeline class per mode, built with from_pipe on the loaded model (sd_core/controlnet.py)
    controlnet_pipelines: dict[str, str] | None = None
    # diffusers' ControlNet classes for this family: one ControlNet, and several run as one
    controlnet_model: str = "ControlNetModel"
    multi_controlnet_model: str = "MultiControlNetModel"
    # the ControlNet control modes its pipelines run (sd_core/limits.py's CONTROL_MODES): "prompt" (soft injection)
    # scales UNet residual blocks, "control" is diffusers' guess_mode
    controlnet_modes: tuple[str, ...] = CONTROL_MODES
    # an A1111 textual-inversion file's tensors for this family, one per text encoder (sd_core/embeddings.py)
    embedding_keys: tuple[str, ...] = ("clip_l",)
    # the engine features this family has (the constants above); a request using another one is refused
    features: frozenset[str] = SD_FEATURES
    # the pipeline component that denoises: "unet", or "transformer" (DiT families: SD3, FLUX)
    denoiser: str = "unet"
    # the dtype this family runs in on CUDA when SD_DTYPE is auto (None: the worker's, fp16); FLUX: bfloat16
    cuda_dtype: str | None = None
    # the sampler a manifest gets when its defaults name none
    scheduler: str = "DPM++ 2M Karras"
    # T5 families (MAX_SEQUENCE_LENGTH): the T5 token count when neither request nor manifest sets one; None: no T5
    max_sequence_length: int | None = None
    # components a manifest may leave out (`skip_components`), each with the pipeline arguments then given as None
    optional_components: dict[str, tuple[str, ...]] | None = None
    # the request modes (GenerationRequest.mode) its models run; FLUX.1 Fill only inpaints (sd_core/family_features.py)
    modes: tuple[str, ...] = ("txt2img", "img2img", "inpaint")

    @property
    def defaults(self) -> dict[str, Any]:
        """The request defaults manifests start from."""
        defaults = {"width": self.width, "height": self.height, "num_inference_steps": self.num_inference_steps,
                    "guidance_scale": self.guidance_scale, "scheduler": self.scheduler}
        if self.max_sequence_length is not None:
            defaults["max_sequence_length"] = self.max_sequence_length
        return defaults

    def supports(self, feature: str) -> bool:
        """Whether this family has the engine feature ``feature`` (one of the constants of this module); ControlNet
        also needs its ControlNet pipelines."""
        if feature == CONTROLNET and not self.controlnet_pipelines:
            return False
        return feature in self.features

    def pipeline_class(self, mode: str):
        """The diffusers pipeline class for ``mode`` (importing it costs seconds the first time)."""
        import diffusers

        return getattr(diffusers, self.pipelines[mode])

    def controlnet_pipeline_class(self, mode: str):
        """The diffusers ControlNet pipeline class for ``mode``; None when this family has none."""
        import diffusers

        name = (self.controlnet_pipelines or {}).get(mode)
        return getattr(diffusers, name) if name else None

    def controlnet_image_kwarg(self, mode: str) -> str:
        """The ControlNet pipeline's control-image argument for ``mode`` (SD/SDXL txt2img: ``image``)."""
        return "image" if mode == "txt2img" else "control_image"

    def controlnet_mismatch(self, denoiser: Any, config: dict[str, Any]) -> tuple[str, str] | None:
        """(what the ControlNet is, what this model is) when a ControlNet with ``config`` cannot steer a denoiser
        with config ``denoiser`` (another architecture); None when it fits. UNet families: the cross-attention width
        and added conditioning must be the UNet's."""
        theirs = (config.get("cross_attention_dim"), config.get("addition_embed_type"))
        ours = (denoiser.cross_attention_dim, denoiser.addition_embed_type)
        kind = config.get("_class_name") or "ControlNetModel"
        if kind in ("ControlNetModel", "ControlNetUnionModel"):
            if theirs == ours:
                return None
            kind = "SDXL-like" if theirs[1] == "text_time" else "SD1.x/SD2-like"
        return f"{kind}: cross_attention_dim {theirs[0]}", f"cross_attention_dim {ours[0]}"

    def prepare_controlnets(self, pipe, modules: list) -> None:
        """Make ControlNet ``modules`` ready for ``pipe`` (this family's ControlNet pipeline) before they are set on
        it; nothing for UNet families."""

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """A batch's prompts (one per image) as pipeline keyword arguments.

        The negative prompt is None when all are empty: SDXL (force_zeros_for_empty_prompt) then zeros the negative
        embedding, as bare diffusers and A1111 do; SD1.x/2.x encode "" either way. Jobs with empty and non-empty
        negative prompts never share a batch (``Job.batch_key``).
        """
        return {"prompt": prompts, "negative_prompt": negative_prompts if any(negative_prompts) else None}

    def clip_skip_limit(self, pipe) -> tuple[int, int] | None:
        """(the text encoder's depth, the most layers a request may skip: one always stays); None: no clip skip."""
        if not self.clip_skip:
            return None
        depth = pipe.text_encoder.config.num_hidden_layers
        return depth, depth - 1

    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names this family can run (every one; flow-matching families: Euler only)."""
        return SCHEDULER_NAMES

    def build_scheduler(self, name: str, base_config: dict[str, Any], steps: int | None = None):
        """The scheduler ``name`` (one of ``schedulers()``) built from a loaded model's own scheduler config, for runs
        of ``steps`` steps (None: more than one; a one-step run may need another spacing: schedulers.py)."""
        from ..schedulers import build_scheduler

        return build_scheduler(name, base_config, steps)

    def sigma_scheduler(self, base_config: dict[str, Any]):
        """The scheduler running a request's own ``sigmas``: Euler (diffusers' EulerDiscreteScheduler, configured as
        the engine's ``Euler``), which maps each sigma to its fractional timestep on the model's training sigmas."""
        return self.build_scheduler(EULER, base_config)

    def check_sigmas(self, req, model: str) -> None:
        """InvalidRequest (field ``sigmas``) for a request whose own ``sigmas`` this family cannot run exactly: only
        Euler takes them; the hires fix's and the refiner's second passes would need their own schedules (ControlNet
        img2img / inpaint pipelines, which take no sigmas, get them on their scheduler: sd_core/scheduler_sigmas.py)."""
        why = None
        if req.scheduler != EULER:
            why = (f"run with the Euler sampler only (diffusers' EulerDiscreteScheduler takes them), not "
                   f"{quote(req.scheduler, 40)}; leave scheduler empty or use Euler")
        elif req.hires is not None:
            why = "are not supported with the hires fix (its second pass would need a schedule of its own)"
        elif req.refine != "no_refiner":
            why = "are not supported with a refiner (its pass would need a schedule of its own)"
        if why:
            raise InvalidRequest(f"{quote(model)} is a {self.name} model, whose sigmas {why}", field="sigmas")

    def call_kwargs(self, job) -> dict[str, Any]:
        """What this family adds to the ``pipe(...)`` call of a job (a ``sd_core.jobs.Job``): a request's own
        ``sigmas`` (then 0, as EulerDiscreteScheduler takes them), a T5 family's token count (FLUX also adds the
        size its img2img takes as an argument)."""
        kwargs: dict[str, Any] = {}
        if job.request.sigmas is not None:
            kwargs["sigmas"] = [*job.request.sigmas, 0.0]
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = job.request.max_sequence_length or self.max_sequence_length
        return kwargs

    def infotext_fields(self, job) -> dict[str, Any]:
        """This family's own infotext fields for a job (written after A1111's): a T5 family's token count, which
        changes the image (not an A1111 field: A1111 has no such setting); a request's own ``sigmas`` (they set the
        schedule, which the sampler name no longer says)."""
        fields: dict[str, Any] = {}
        length = job.request.max_sequence_length
        if length is not None:
            fields["Max sequence length"] = length
        if job.request.sigmas is not None:
            fields["Sigmas"] = " ".join(f"{s:.8g}" for s in job.request.sigmas)  # no commas: unquoted
        return fields

    def load_single_file(self, cls, weights: str, config: str, **kwargs):
        """The txt2img pipeline ``cls`` of a single-file checkpoint, its configs from the local folder ``config``."""
        return cls.from_single_file(weights, config=config, **kwargs)

    def detect(self, keys: Iterable[str]) -> bool:
        """Whether a single-file checkpoint with these state-dict keys belongs to this family."""
        return any(key.startswith(self.checkpoint_prefixes) for key in keys)

    def variant(self, shapes: dict[str, list[int]]) -> str:
        """The architecture of a checkpoint this family detected, from its tensors' shapes (a safetensors header):
        this family's name here; FLUX tells FLUX.1 Fill apart. ValueError (a reason) for a variant no family runs."""
        return self.name

    def memory_bytes(self, bytes_per_parameter: int = 2) -> int:
        """A rough estimate of the loaded pipeline's weights (fp16 by default); not used for decisions yet (the
        pipeline pool measures loaded models), meant for placement and cache planning."""
        return self.parameters * bytes_per_parameter
