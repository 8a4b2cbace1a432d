"""The request's nested parts: LoRA, hires fix, embedding, outpaint, ControlNet unit and IP-Adapter specs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import quote
from .limits import (
    CONTROL_HIRES_OPTIONS,
    CONTROL_MODES,
    CONTROL_RESIZE_MODES,
    EMBEDDING_NAME_PATTERN,
    MAX_CONTROL_SCALE,
    MAX_GUIDANCE,
    MAX_IP_ADAPTER_SCALE,
    MAX_LORA_SCALE,
    MAX_OUTPAINT,
    MAX_PROMPT_CHARS,
    MAX_SCHEDULER_CHARS,
    MAX_SIZE,
    MAX_STEPS,
    UNION_CONTROL_TYPES,
)
from .preprocessor_names import canonical, unavailable
from .schedulers import SCHEDULER_NAMES, checked_name

SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


def scheduler_name(value):
    """A sampler name in its canonical spelling (other types are left to the field's own type check)."""
    if isinstance(value, str):
        if len(value) > MAX_SCHEDULER_CHARS:
            raise ValueError(f"unknown scheduler {quote(value, 40)}: longer than {MAX_SCHEDULER_CHARS} "
                             "characters, which no sampler name is")
        return checked_name(value)
    return value


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
        return scheduler_name(value)

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
        "balanced", description="balanced; prompt: my prompt is more important (soft injection); control: ControlNet "
                                "is more important (diffusers' guess_mode)")
    preprocessor: str = Field("none", max_length=64, description="none (the image is the control map), canny, "
                              "or another module (lineart_realistic, softedge_pidinet, ...: /controlnet/module_list)")
    resize_mode: Literal[CONTROL_RESIZE_MODES] = Field(  # type: ignore[valid-type]
        "just_resize", description="How the control image is fitted to the output size")
    processor_res: int | None = Field(None, ge=64, le=MAX_SIZE,
                                      description="Preprocessor resolution (short side); empty: the output size")
    low_threshold: int = Field(100, ge=0, le=255, description="canny: low threshold")
    high_threshold: int = Field(200, ge=0, le=255, description="canny: high threshold")
    value_threshold: float = Field(0.1, ge=0.01, le=2.0, allow_inf_nan=False,
                                   description="mlsd: the least score of a line (the extension's MLSD Value Threshold)")
    distance_threshold: float = Field(0.1, ge=0.01, le=20.0, allow_inf_nan=False,
                                      description="mlsd: the least length of a line, in pixels of the network's "
                                                  "half-resolution map (the extension's MLSD Distance Threshold)")
    hires_option: Literal[CONTROL_HIRES_OPTIONS] = Field(  # type: ignore[valid-type]
        "both", description="With the hires fix: the passes it steers (both, low_res_only, high_res_only)")
    control_type: Literal[UNION_CONTROL_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Union ControlNets only: the kind of control map (openpose, depth, softedge, canny, ...)")

    @field_validator("preprocessor")
    @classmethod
    def _known_preprocessor(cls, value: str) -> str:
        name = canonical(value)
        if name is None:
            raise ValueError(unavailable(value))
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
