"""The request and result types: GenerationRequest is the single source of truth for every parameter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest, quote
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
MAX_IP_ADAPTER_IMAGES = 4  # reference images of one request (one IP-Adapter model per request)
MAX_IP_ADAPTER_SCALE = 2.0
MAX_CLIP_SKIP = 11  # CLIP ViT-L has 12 layers: at least one stays (each model is checked against its own depth)
OUTPUT_FORMATS = ("png", "webp", "jpeg")
MAX_SCHEDULER_CHARS = 64  # longer than any sampler name or alias: refused unread
MAX_MESSAGE_PARTS = 10  # validation errors described in one message; the rest are counted
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
    model: str | None = Field(None, max_length=200, description="Model name from models/*.yaml; default: the worker's")
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
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS, description="LoRAs to apply")
    ip_adapters: list[IpAdapterSpec] = Field(
        default_factory=list, max_length=MAX_IP_ADAPTER_IMAGES,
        description="Image prompts (IP-Adapter): reference images for one IP-Adapter of the model",
    )
    clip_skip: int = Field(
        0, ge=0, le=MAX_CLIP_SKIP,
        description="Text-encoder layers to skip at the end (diffusers' clip_skip = A1111's clip skip - 1); 0: none",
    )
    tiling: bool = Field(
        False, description="Seamless tiling: the image wraps around its edges (circular padding in UNet and VAE)"
    )
    output_format: Literal[OUTPUT_FORMATS] = Field("png", description="Image file format")  # type: ignore[valid-type]
    output_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless)")
    disable_safety_checker: bool = Field(
        False, description="Skip the safety checker (which blacks out flagged images); ignored where it is off"
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _canonical_scheduler(cls, value):
        if isinstance(value, str):
            if len(value) > MAX_SCHEDULER_CHARS:
                raise ValueError(f"unknown scheduler {quote(value, 40)}: longer than {MAX_SCHEDULER_CHARS} "
                                 "characters, which no sampler name is")
            return checked_name(value)
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
        return self

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint, from which images are given."""
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"


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


def parse_request(data: dict) -> GenerationRequest:
    """Validate a plain dict into a GenerationRequest; raise InvalidRequest naming the field(s) otherwise."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(data).__name__}", field="input")
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


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

