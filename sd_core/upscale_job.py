"""Upscale-only jobs: UpscaleRequest (native) and A1111's /sdapi/v1/extra-single-image, run by engine.upscalers."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequest, quote
from .input_images import load_image
from .outputs import encode_image
from .schema import OUTPUT_FORMATS, GeneratedImage, describe_validation_error, field_label, parse_model

MAX_SIDE = 8192  # of an upscaled image, whatever SD_MAX_PIXELS allows
EXTRAS_ENDPOINT = "extra-single-image"
# A1111 1.10's ExtrasSingleImageRequest keys, with their defaults where they matter.
EXTRAS_KEYS = frozenset({
    "image", "resize_mode", "show_extras_results", "gfpgan_visibility", "codeformer_visibility", "codeformer_weight",
    "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop", "upscaler_1", "upscaler_2",
    "extras_upscaler_2_visibility", "upscale_first",
})
EXTRAS_REFUSED = ("gfpgan_visibility", "codeformer_visibility")  # face restoration: accepted only at 0


class UpscaleRequest(BaseModel):
    """One upscale-only job (RunPod input ``{"upscale": {...}}``): an image, a size, an upscaler.

    The size, as A1111 computes it: ``scale`` -> each side times scale, rounded down to a multiple of 8; ``width``
    and ``height`` -> the smallest such scale that covers both (the aspect ratio is kept), then with ``crop`` the
    centre width x height of it.
    """

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="the image: base64, data URI or URL (the user-URL policy)")
    upscaler: str = Field("Lanczos", max_length=100, description="None, Lanczos, Nearest or a model upscaler")
    scale: float | None = Field(None, gt=0, le=16, description="upscale factor (default 2 without width/height)")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="target width (with height)")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="target height (with width)")
    crop: bool = Field(False, description="with width and height: crop the covering image to exactly that size")
    upscaler_2: str = Field("None", max_length=100, description="a second upscaler blended in (A1111's upscaler 2)")
    upscaler_2_visibility: float = Field(0.0, ge=0, le=1, description="its weight in the blend (0 = off)")
    output_format: Literal[OUTPUT_FORMATS] = "png"  # type: ignore[valid-type]
    output_quality: int = Field(90, ge=1, le=100)

    @model_validator(mode="after")
    def _one_size(self):
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height: give both (or neither, and a scale)")
        if self.scale is not None and self.width is not None:
            raise ValueError("scale: give either a scale or width and height, not both")
        if self.crop and self.width is None:
            raise ValueError("crop: needs width and height")
        return self

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int] | None, float]:
        """For an input of ``width`` x ``height``: (upscaled size, crop size or None, the scale used)."""
        if self.width is not None:
            scale = max(self.width / width, self.height / height)
        else:
            scale = self.scale if self.scale is not None else 2.0
        upscaled = (int(width * scale // 8 * 8), int(height * scale // 8 * 8))
        return upscaled, (self.width, self.height) if self.crop else None, scale


@dataclass
class UpscaleResult:
    """What run_upscale returns: the encoded image, its infotext (A1111's "Postprocess ..." line) and timings."""

    image: GeneratedImage
    parameters: str
    upscaler: str
    timings: dict[str, float] = field(default_factory=dict)


def parse_upscale(data) -> UpscaleRequest:
    """A native ``upscale`` input -> UpscaleRequest; InvalidRequest naming the field (``upscale.scale: ...``)."""
    return parse_model(UpscaleRequest, data, "upscale")


def from_extras(payload: dict) -> UpscaleRequest:
    """A1111's /sdapi/v1/extra-single-image body -> UpscaleRequest; InvalidRequest in A1111's key names."""
    p = {key: value for key, value in payload.items() if value is not None}
    errors = [f"{field_label(key)}: unknown field for /sdapi/v1/{EXTRAS_ENDPOINT}"
              for key in sorted(set(p) - EXTRAS_KEYS)[:5]]
    for key in EXTRAS_REFUSED:
        if p.get(key, 0) not in (0, 0.0) or isinstance(p.get(key), bool):
            errors.append(f"{key}: face restoration is not supported by this worker (only 0)")
    mode = p.get("resize_mode", 0)
    if mode not in (0, 1) or isinstance(mode, bool):
        errors.append(f"resize_mode: 0 (upscaling_resize) or 1 (upscaling_resize_w/h), got {quote(mode)}")
    if errors:
        raise InvalidRequest("; ".join(errors))
    fields = {"image": p.get("image", ""), "upscaler": p.get("upscaler_1", "None"),
              "upscaler_2": p.get("upscaler_2", "None"),
              "upscaler_2_visibility": p.get("extras_upscaler_2_visibility", 0)}
    if mode == 0:
        fields["scale"] = p.get("upscaling_resize", 2)
    else:
        fields.update(width=p.get("upscaling_resize_w", 512), height=p.get("upscaling_resize_h", 512),
                      crop=p.get("upscaling_crop", True))
    names = {"upscaler": "upscaler_1", "upscaler_2_visibility": "extras_upscaler_2_visibility",
             "scale": "upscaling_resize", "width": "upscaling_resize_w", "height": "upscaling_resize_h",
             "crop": "upscaling_crop"}
    try:
        return UpscaleRequest.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc, names)) from None


def to_extras_response(result: UpscaleResult, image: str) -> dict:
    """A1111's ExtrasSingleImageResponse: ``{"html_info", "image"}`` (base64 PNG, or the uploaded image's URL)."""
    return {"html_info": f"<p>{html.escape(result.parameters)}</p>", "image": image}


def run_upscale(engine, request: UpscaleRequest, should_cancel=None) -> UpscaleResult:
    """Decode the image (URL policy, size limits), upscale it with engine.upscalers, encode it with its infotext."""
    started = time.perf_counter()
    upscalers = engine.upscalers
    upscalers.check(request.upscaler, "upscaler")
    upscalers.check(request.upscaler_2, "upscaler_2")
    image = load_image(request.image, "image", engine.settings).convert("RGB")
    (width, height), crop, scale = request.sizes(image.width, image.height)
    if width < 8 or height < 8 or max(width, height) > MAX_SIDE:
        raise InvalidRequest(f"the upscaled image would be {width}x{height}; each side must be 8 to {MAX_SIDE}",
                             field="scale")
    if width * height > engine.settings.max_pixels:
        raise InvalidRequest(f"the upscaled image would be {width}x{height} = {width * height} pixels, over this "
                             f"worker's budget of {engine.settings.max_pixels} (SD_MAX_PIXELS)", field="scale")
    prepare_s = time.perf_counter() - started
    t = time.perf_counter()
    result = upscalers.upscale(request.upscaler, [image], width, height, should_cancel)[0]
    info = ([f"Postprocess upscale to: {request.width}x{request.height}"] if request.width is not None
            else [f"Postprocess upscale by: {scale:g}"])
    info.append(f"Postprocess upscaler: {request.upscaler}")
    if request.upscaler_2 != "None" and request.upscaler_2_visibility > 0:
        from PIL import Image

        second = upscalers.upscale(request.upscaler_2, [image], width, height, should_cancel)[0]
        result = Image.blend(result, second, request.upscaler_2_visibility)
        info += [f"Postprocess upscaler 2: {request.upscaler_2}",
                 f"Postprocess upscaler 2 visibility: {request.upscaler_2_visibility:g}"]
    if crop is not None:  # as A1111: the covering image centred on a canvas of exactly that size
        from PIL import Image

        canvas = Image.new("RGB", crop)
        canvas.paste(result, box=(crop[0] // 2 - result.width // 2, crop[1] // 2 - result.height // 2))
        result = canvas
        info.append(f"Postprocess crop to: {crop[0]}x{crop[1]}")
    upscale_s = time.perf_counter() - t
    t = time.perf_counter()
    parameters = ", ".join(info)
    encoded = encode_image(result, fmt=request.output_format, quality=request.output_quality,
                           parameters=parameters, seed=-1)
    timings = {"prepare_s": prepare_s, "upscale_s": upscale_s, "encode_s": time.perf_counter() - t,
               "total_s": time.perf_counter() - started}
    return UpscaleResult(image=encoded, parameters=parameters, upscaler=request.upscaler, timings=timings)
