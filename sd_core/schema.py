"""The request and result types: GenerationRequest is the single source of truth for every parameter."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest, quote
from .limits import (  # noqa: F401 - re-exported: the request's limits are part of this module's interface
    CONTROL_MODES,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    EMBEDDING_NAME_PATTERN,
    INPAINT_FILLS,
    MAX_CLIP_SKIP,
    MAX_CONTROL_SCALE,
    MAX_CONTROLNETS,
    MAX_CROP_PADDING,
    MAX_EMBEDDINGS,
    MAX_GUIDANCE,
    MAX_IMAGE_PIXELS,
    MAX_IP_ADAPTER_IMAGES,
    MAX_IP_ADAPTER_SCALE,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_MASK_BLUR,
    MAX_MESSAGE_PARTS,
    MAX_MODEL_NAME_CHARS,
    MAX_MODEL_URL_CHARS,
    MAX_OUTPAINT,
    MAX_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_REASON_CHARS,
    MAX_SCHEDULER_CHARS,
    MAX_SEED,
    MAX_SEQUENCE_LENGTH,
    MAX_SIGMA,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    OUTPUT_FORMATS,
    REFINE_MODES,
    RESIZE_MODES,
)
from .request_parts import (  # noqa: F401 - re-exported with the request
    ControlNetUnit,
    EmbeddingSpec,
    HiresSpec,
    IpAdapterSpec,
    LoraSpec,
    OutpaintSpec,
    SchedulerName,
    scheduler_name,
)


class GenerationRequest(BaseModel):
    """Everything one generation needs. ``None`` means "the model's default" (from its manifest)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Text prompt; A1111 <lora:name:scale> tags work")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What the image should not contain")
    model: str | None = Field(
        None, max_length=MAX_MODEL_URL_CHARS,
        description="Model name from models/*.yaml, or an https:// / s3:// URL of a .safetensors checkpoint; "
                    "default: the worker's",
    )
    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, description="Width in pixels, multiple of 8")
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, description="Height in pixels, multiple of 8")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance scale"
    )
    scheduler: SchedulerName | None = Field(None, description="A1111 sampler name")  # type: ignore[valid-type]
    sigmas: list[float] | None = Field(
        None, min_length=1, max_length=MAX_STEPS,
        description="The noise level of each step, decreasing, above 0, without the final 0 (num_inference_steps = "
                    "their count): FLUX, SD3: at most 1; SD 1.x/2/SDXL: the Euler sampler's; empty: the scheduler's",
    )
    eta: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Sampler noise (DDIM, TCD); empty: the sampler's default (docs/api.md)",
    )
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Random seed; empty or -1 for a random one")
    subseed: int | None = Field(
        None, ge=-1, le=MAX_SEED, description="Variation seed (image i uses subseed + i); empty or -1 for a random one"
    )
    subseed_strength: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="How far the initial noise moves from the seed's to the subseed's (slerp): 0 = seed, 1 = subseed",
    )
    num_outputs: int = Field(1, ge=1, le=MAX_OUTPUTS, description="Number of images")
    image: str | None = Field(None, description="Init image for img2img/inpaint: base64, data URI or https URL")
    mask: str | None = Field(None, description="Inpaint mask (white = repaint): base64, data URI or https URL")
    strength: float = Field(
        0.8, gt=0.0, le=1.0, allow_inf_nan=False, description="How much img2img/inpaint changes the init image"
    )
    resize_mode: Literal[RESIZE_MODES] = Field(  # type: ignore[valid-type]
        "resize", description="Init image of another size than width x height: resize (stretch), crop, fill, "
        "latent (encoded at its own size, the latent resized)"
    )
    mask_blur: int = Field(0, ge=0, le=MAX_MASK_BLUR, description="Gaussian blur of the mask (std, pixels)")
    mask_blur_y: int | None = Field(
        None, ge=0, le=MAX_MASK_BLUR, description="Vertical mask blur when it differs; empty: mask_blur"
    )
    invert_mask: bool = Field(False, description="Invert the mask: repaint the black part")
    inpaint_fill: Literal[INPAINT_FILLS] = Field(  # type: ignore[valid-type]
        "original", description="Masked area before denoising: fill, original, latent_noise, latent_nothing"
    )
    padding_mask_crop: int | None = Field(
        None, ge=0, le=MAX_CROP_PADDING,
        description="Only masked: inpaint the mask's box plus this padding at width x height, paste it back",
    )
    inpaint_overlay: bool = Field(False, description="Keep the original image outside the (blurred) mask")
    outpaint: OutpaintSpec | None = Field(None, description="Grow the canvas: pixels per side, repainted")
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS, description="LoRAs to apply")
    embeddings: list[EmbeddingSpec] = Field(
        default_factory=list, max_length=MAX_EMBEDDINGS,
        description="Textual-inversion embeddings by URL, used where their name is a word of a prompt",
    )
    clip_skip: int = Field(
        0, ge=0, le=MAX_CLIP_SKIP,
        description="Text-encoder layers to skip at the end (diffusers' clip_skip = A1111's clip skip - 1); 0: none",
    )
    max_sequence_length: int | None = Field(
        None, ge=1, le=MAX_SEQUENCE_LENGTH,
        description="T5 prompt tokens (FLUX, SD3): empty: the model's default (FLUX.1-schnell 256, dev 512, SD3 256)",
    )
    ip_adapters: list[IpAdapterSpec] = Field(
        default_factory=list, max_length=MAX_IP_ADAPTER_IMAGES,
        description="Image prompts (IP-Adapter): reference images for one IP-Adapter of the model",
    )
    controlnets: list[ControlNetUnit] = Field(
        default_factory=list, max_length=MAX_CONTROLNETS, description="ControlNet units (docs/api.md)"
    )
    tiling: bool = Field(
        False, description="Seamless tiling: the image wraps around its edges (circular padding in UNet and VAE)"
    )
    vae: str | None = Field(
        None, max_length=200,
        description="VAE from the model's manifest (`vaes`); empty, Automatic or None: the model's own",
    )
    hires: HiresSpec | None = Field(None, description="Hires fix (docs/api.md); empty: one pass")
    refine: Literal[REFINE_MODES] = Field(  # type: ignore[valid-type]
        "no_refiner", description="SDXL refiner pass: no_refiner, expert_ensemble_refiner or base_image_refiner"
    )
    refiner: str | None = Field(
        None, max_length=200, description="Refiner model; empty: the model's manifest `refiner`, else the worker's"
    )
    high_noise_frac: float = Field(
        0.8, ge=0.0, le=1.0, allow_inf_nan=False,
        description="expert_ensemble_refiner: fraction of the steps the base model runs before the refiner (1: none)",
    )
    refine_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="base_image_refiner: the refiner's steps; empty: num_inference_steps"
    )
    output_format: Literal[OUTPUT_FORMATS] = Field("png", description="Image file format")  # type: ignore[valid-type]
    output_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless)")
    disable_safety_checker: bool = Field(
        False, description="Skip the safety checker (which blacks out flagged images); ignored where it is off"
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _canonical_scheduler(cls, value):
        return scheduler_name(value)

    @field_validator("sigmas")
    @classmethod
    def _decreasing_sigmas(cls, value):
        if value is None:
            return value
        if not all(math.isfinite(s) and 0 < s <= MAX_SIGMA for s in value):
            raise ValueError(f"each sigma must be above 0 and at most {MAX_SIGMA:g} (FLUX, SD3: at most 1)")
        if any(b >= a for a, b in itertools.pairwise(value)):
            raise ValueError("must decrease from one step to the next")
        return value

    @field_validator("model")
    @classmethod
    def _bounded_name(cls, value):
        if value is not None and "://" not in value and len(value) > MAX_MODEL_NAME_CHARS:
            raise ValueError(f"a model name has at most {MAX_MODEL_NAME_CHARS} characters (a URL: "
                             f"{MAX_MODEL_URL_CHARS})")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value

    @model_validator(mode="after")
    def _cross_field(self):
        if self.width and self.height and self.width * self.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"width x height: {self.width}x{self.height} = {self.width * self.height} pixels"
                f" exceeds the limit of {MAX_IMAGE_PIXELS} pixels"
            )
        if self.sigmas is not None and self.num_inference_steps is None:
            self.num_inference_steps = len(self.sigmas)
        elif self.sigmas is not None and self.num_inference_steps != len(self.sigmas):
            raise ValueError(f"sigmas: {len(self.sigmas)} sigmas for num_inference_steps {self.num_inference_steps}; "
                             "give one sigma per step (or leave num_inference_steps empty)")
        if self.mask is not None and self.image is None:
            raise ValueError("mask: needs an image too (inpainting repaints the masked part of `image`)")
        if self.subseed_strength > 0 and self.image is not None:
            raise ValueError("subseed_strength: variation seeds work for txt2img only, not with an init image; use 0")
        if self.hires is not None and self.image is not None:
            raise ValueError("hires: the hires fix is for txt2img only, not with an init image")
        if self.hires is not None and self.subseed_strength > 0:
            raise ValueError("hires: not combined with variation seeds (subseed_strength) by this worker; use 0")
        self._check_inpainting()
        if self.refine != "no_refiner" and self.image is not None:
            raise ValueError("refine: the refiner pass works for txt2img only here, not with an init image")
        if self.refine != "no_refiner" and self.hires is not None:
            raise ValueError("refine: not combined with the hires fix by this worker; use one of them")
        if self.refine == "no_refiner" and self.refiner:
            raise ValueError("refiner: set refine (expert_ensemble_refiner or base_image_refiner) to use a refiner")
        if self.refine == "expert_ensemble_refiner" and self.high_noise_frac == 0:
            raise ValueError("high_noise_frac: must be above 0 (the base model runs this fraction of the steps); "
                             "for an img2img pass of the refiner on the finished image use base_image_refiner")
        return self

    def _check_inpainting(self) -> None:
        """Inpainting options need something to inpaint; outpainting makes its own mask."""
        if self.outpaint is not None:
            if self.image is None:
                raise ValueError("outpaint: needs an image to grow")
            if self.mask is not None:
                raise ValueError("outpaint: makes its own mask; give no mask")
            if self.invert_mask:
                raise ValueError("invert_mask: not with outpaint (its mask is made here)")
        if self.resize_mode != "resize" and self.image is None:
            raise ValueError("resize_mode: needs an image")
        if self.resize_mode == "latent" and (self.mask is not None or self.outpaint is not None or self.controlnets):
            raise ValueError("resize_mode: latent is for img2img without a mask, outpaint or ControlNet units here; "
                             "use resize, crop or fill")
        if self.mask is None and self.outpaint is None:
            for name, default in (("mask_blur", 0), ("mask_blur_y", None), ("invert_mask", False),
                                  ("inpaint_fill", "original"), ("padding_mask_crop", None),
                                  ("inpaint_overlay", False)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: needs a mask (or outpaint)")
        if self.outpaint is not None and self.width and self.height:
            o = self.outpaint
            problem = outpaint_size_problem(self.width + o.left + o.right, self.height + o.top + o.bottom)
            if problem:
                raise ValueError(f"outpaint: {problem}")

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint, from which images are given."""
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None or self.outpaint is not None else "img2img"


def outpaint_size_problem(width: int, height: int) -> str | None:
    """Why a grown canvas of this size is refused (None: it is not): within MAX_SIZE a side and MAX_IMAGE_PIXELS."""
    if max(width, height) > MAX_SIZE or width * height > MAX_IMAGE_PIXELS:
        return (f"the grown canvas is {width}x{height}; the limits are {MAX_SIZE} pixels a side and "
                f"{MAX_IMAGE_PIXELS} pixels in all")
    return None


def resolve_seed(seed: int | None) -> int:
    """None or -1 -> a fresh random 32-bit seed (reported back), else the seed itself."""
    return random.randint(0, MAX_SEED) if seed is None or seed == -1 else seed


def describe_validation_error(error: ValidationError, names: dict[str, str] | None = None) -> str:
    """Turn pydantic's error into ``"field: reason; field: reason"`` (no pydantic boilerplate, no input echo).

    Bounded whatever the input: long keys are shortened like user values, at most MAX_MESSAGE_PARTS errors are
    described (the rest counted), and no single reason runs past MAX_REASON_CHARS (room for our own lists of valid
    values, such as the sampler names; user values inside reasons are already quote()d).
    """
    parts = []
    items = error.errors(include_url=False, include_input=False, include_context=False)
    for item in items[:MAX_MESSAGE_PARTS]:
        loc = [field_label(p) for p in item["loc"]]
        if loc and names:  # the caller's own names for the fields (A1111's keys)
            loc[0] = names.get(loc[0], loc[0])
        loc = ".".join(loc)
        msg = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        msg = msg if len(msg) <= MAX_REASON_CHARS else msg[:MAX_REASON_CHARS - 1] + "…"
        # Cross-field checks (no location) already start their message with the field names.
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(items) > MAX_MESSAGE_PARTS:
        parts.append(f"and {len(items) - MAX_MESSAGE_PARTS} more errors")
    return "; ".join(parts)


def field_label(key) -> str:
    """A field name or list index as an error names it: as is when short, an empty key as '', else quote()d."""
    text = str(key)
    return text if 0 < len(text) <= 64 else quote(text, 64)


def parse_model(model: type[BaseModel], data, field: str):
    """Validate a plain dict into ``model``; raise InvalidRequest naming the field(s) otherwise (``field`` when the
    input is no JSON object at all)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(data).__name__}", field=field)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def parse_request(data: dict) -> GenerationRequest:
    """Validate a plain dict into a GenerationRequest; raise InvalidRequest naming the field(s) otherwise."""
    return parse_model(GenerationRequest, data, "input")


@dataclass
class GeneratedImage:
    """One encoded output image."""

    data: bytes
    mime_type: str
    extension: str
    seed: int
    width: int
    height: int
    nsfw: bool = False  # flagged by the safety checker (and blacked out); False also when the checker did not run


@dataclass
class GenerationResult:
    """What Engine.generate returns: encoded images, the seeds used, the A1111 infotext, timings (seconds) and the
    effective request (the model's defaults filled in, the prompt as the user gave it)."""

    images: list[GeneratedImage]
    seeds: list[int]
    model: str
    parameters: str
    subseeds: list[int] | None = None  # the variation seed of each image, when subseed_strength > 0
    timings: dict[str, float] = field(default_factory=dict)
    safety_checked: bool = False  # whether the safety checker ran on these images
    request: GenerationRequest | None = None  # the request as generated (set by Engine.finish)

    @property
    def seed(self) -> int:
        return self.seeds[0]

