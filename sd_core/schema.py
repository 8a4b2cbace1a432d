"""The request and result types: GenerationRequest is the single source of truth for every parameter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest, quote
from .inpainting import INPAINT_FILLS, RESIZE_MODES
from .schedulers import SCHEDULER_NAMES, checked_name

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_IMAGE_PIXELS = 1536 * 1536  # width * height of one image
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_OUTPUTS = 8
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000
MAX_LORAS = 8
MAX_LORA_SCALE = 5.0
MAX_EMBEDDINGS = 16  # textual-inversion embeddings a request may bring in `embeddings`
EMBEDDING_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # as manifest names: the word that triggers it
MAX_MODEL_NAME_CHARS = 200  # a manifest name; a `model` URL may be longer (MAX_MODEL_URL_CHARS)
MAX_MODEL_URL_CHARS = 2048
MAX_CONTROLNETS = 4  # ControlNet units of one request
MAX_CONTROL_SCALE = 2.0  # A1111's weight slider goes to 2
CONTROL_PREPROCESSORS = ("none", "canny")  # built in (sd_core/control_images.py); weight-based ones are not
CONTROL_MODES = ("balanced", "prompt", "control")
CONTROL_RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
MAX_IP_ADAPTER_IMAGES = 4  # reference images of one request (one IP-Adapter model per request)
MAX_IP_ADAPTER_SCALE = 2.0
MAX_CLIP_SKIP = 11  # CLIP ViT-L has 12 layers: at least one stays (each model is checked against its own depth)
OUTPUT_FORMATS = ("png", "webp", "jpeg")
# Replicate's SDXL names (stability-ai/sdxl): no second pass; the refiner denoises the last steps of the base's
# schedule (ensemble of experts); the refiner runs img2img on the base's finished image (sd_core/refiner.py)
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
MAX_SCHEDULER_CHARS = 64  # longer than any sampler name or alias: refused unread
MAX_MESSAGE_PARTS = 10  # validation errors described in one message; the rest are counted
MAX_MASK_BLUR = 64  # std in pixels of the mask's Gaussian blur
MAX_CROP_PADDING = 1024  # only-masked inpainting: pixels around the mask's bounding box
MAX_OUTPAINT = 1024  # pixels added on one side
MAX_REASON_CHARS = 1500  # one reason's length: room for the lists of valid values we write ourselves

SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


class LoraSpec(BaseModel):
    """One LoRA to apply: a manifest LoRA name or a URI (s3://, https://), with its scales."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, max_length=2048, description="LoRA name from a manifest, or an s3:// / https:// URI"
    )
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False, description="UNet scale")
    text_encoder_scale: float | None = Field(
        None, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False,
        description="Text-encoder scale (defaults to `scale`)",
    )


class HiresSpec(BaseModel):
    """Hires fix (A1111's enable_hr): the first pass at the request's size, upscaled, then an img2img second pass."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        2.0, ge=1.0, le=4.0, allow_inf_nan=False, description="Upscale factor (unused when width or height is given)"
    )
    width: int = Field(0, ge=0, le=MAX_SIZE, description="Final width; 0: from height keeping the aspect, or scale")
    height: int = Field(0, ge=0, le=MAX_SIZE, description="Final height; 0: from width keeping the aspect, or scale")
    upscaler: str = Field(
        "Latent", min_length=1, max_length=100, description="Latent (...), None, Lanczos, Nearest or an upscaler model"
    )
    steps: int = Field(0, ge=0, le=MAX_STEPS, description="Second-pass steps; 0: the first pass's")
    denoising_strength: float = Field(
        0.7, gt=0.0, le=1.0, allow_inf_nan=False, description="How much the second pass changes the upscaled image"
    )
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Second-pass prompt; empty: the prompt")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Second-pass negative prompt")
    scheduler: SchedulerName | None = Field(None, description="Second-pass sampler; empty: the first's")  # type: ignore[valid-type]
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Second-pass guidance; empty: the first's"
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _canonical_scheduler(cls, value):
        return _scheduler_name(value)

class EmbeddingSpec(BaseModel):
    """A textual-inversion embedding a request brings: the word that triggers it, and where its file is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=EMBEDDING_NAME_PATTERN, description="The word in the prompt that triggers it")
    source: str = Field(
        min_length=1, max_length=2048, description="Embedding name from a manifest, or an s3:// / https:// URI"
    )
class OutpaintSpec(BaseModel):
    """Pixels to add on each side of the init image (multiples of 8); the new area is painted by inpainting."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added on the left, multiple of 8")
    right: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added on the right, multiple of 8")
    top: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added at the top, multiple of 8")
    bottom: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added at the bottom, multiple of 8")

    @field_validator("left", "right", "top", "bottom")
    @classmethod
    def _multiple_of_8(cls, value):
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value

    @model_validator(mode="after")
    def _grows(self):
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("outpaint: give at least one side above 0")
        return self


class ControlNetUnit(BaseModel):
    """One ControlNet unit: a manifest ControlNet, its control image and how strongly and when it steers."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="ControlNet name from a model manifest's controlnets")
    image: str = Field(min_length=1, description="Control image: base64, data URI or https URL")
    scale: float = Field(1.0, ge=0.0, le=MAX_CONTROL_SCALE, allow_inf_nan=False,
                         description="Conditioning scale; 0 skips the unit")
    start: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="Fraction of the steps it starts at")
    end: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="Fraction of the steps it stops at")
    mode: Literal[CONTROL_MODES] = Field(  # type: ignore[valid-type]
        "balanced", description="balanced; control: ControlNet is more important (diffusers' guess_mode)")
    preprocessor: str = Field("none", max_length=64, description="none (the image is the control map) or canny")
    resize_mode: Literal[CONTROL_RESIZE_MODES] = Field(  # type: ignore[valid-type]
        "just_resize", description="How the control image is fitted to the output size")
    processor_res: int | None = Field(None, ge=64, le=MAX_SIZE,
                                      description="Preprocessor resolution (short side); empty: the output size")
    low_threshold: int = Field(100, ge=0, le=255, description="canny: low threshold")
    high_threshold: int = Field(200, ge=0, le=255, description="canny: high threshold")

    @field_validator("preprocessor")
    @classmethod
    def _known_preprocessor(cls, value: str) -> str:
        name = value.strip().lower()
        if name not in CONTROL_PREPROCESSORS:
            raise ValueError(f"{quote(value, 40)} is not available on this worker (weight-based preprocessors such "
                             f"as depth or openpose are not built in); available: {', '.join(CONTROL_PREPROCESSORS)}")
        return name

    @model_validator(mode="after")
    def _window(self):
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) above high_threshold ({self.high_threshold})")
        return self


class IpAdapterSpec(BaseModel):
    """One IP-Adapter image prompt: a reference image for an IP-Adapter of the model's manifest, with its scale."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=200, description="IP-Adapter name from the model's manifest (`ip_adapters:`); empty: its first"
    )
    image: str = Field(min_length=1, description="Reference image: base64, data URI or https URL")
    scale: float = Field(
        1.0, ge=0.0, le=MAX_IP_ADAPTER_SCALE, allow_inf_nan=False,
        description="How strongly the image steers generation; 0: not applied at all",
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
        "resize", description="Init image of another size than width x height: resize (stretch), crop, fill"
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
        return _scheduler_name(value)

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
        if self.mask is not None and self.image is None:
            raise ValueError("mask: needs an image too (inpainting repaints the masked part of `image`)")
        if self.subseed_strength > 0 and self.image is not None:
            raise ValueError("subseed_strength: variation seeds work for txt2img only, not with an init image; use 0")
        if self.hires is not None and self.image is not None:
            raise ValueError("hires: the hires fix is for txt2img only, not with an init image")
        if self.hires is not None and self.subseed_strength > 0:
            raise ValueError("hires: not combined with variation seeds (subseed_strength) by this worker; use 0")
        self._check_inpainting()
        controlled = any(unit.scale > 0 for unit in self.controlnets)
        if controlled and self.tiling:
            raise ValueError("controlnets: not supported together with tiling")
        if controlled and (self.hires is not None or self.refine != "no_refiner"):
            raise ValueError("controlnets: not combined with the hires fix or the refiner by this worker yet; use one")
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


def _scheduler_name(value):
    """A sampler name in its canonical spelling (other types are left to the field's own type check)."""
    if isinstance(value, str):
        if len(value) > MAX_SCHEDULER_CHARS:
            raise ValueError(f"unknown scheduler {quote(value, 40)}: longer than {MAX_SCHEDULER_CHARS} "
                             "characters, which no sampler name is")
        return checked_name(value)
    return value


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

