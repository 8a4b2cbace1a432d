"""Output images: encoding to PNG/WebP/JPEG with the A1111 `parameters` text embedded."""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .schema import GeneratedImage

MIME_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
_EXIF_USER_COMMENT = 0x9286


def infotext(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int, width: int,
    height: int, model: str, strength: float | None = None, loras: dict[str, float] | None = None,
) -> str:
    """The generation parameters in A1111's infotext format (what its PNG Info tab reads back)."""
    fields = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {model}",
    ]
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    if loras:
        fields.append('Lora weights: "' + ", ".join(f"{name}: {scale:g}" for name, scale in loras.items()) + '"')
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_image(image: Image.Image, *, fmt: str, quality: int, parameters: str, seed: int) -> GeneratedImage:
    """Encode one PIL image; the parameters go in a PNG text chunk, or EXIF UserComment for JPEG/WebP."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    else:
        exif = Image.Exif()
        exif[_EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    return GeneratedImage(
        data=buffer.getvalue(), mime_type=MIME_TYPES[fmt], extension=EXTENSIONS[fmt], seed=seed,
        width=image.width, height=image.height,
    )


def read_parameters(data: bytes) -> str | None:
    """The embedded infotext of an encoded image (PNG text chunk or EXIF UserComment), if any."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    raw = image.getexif().get_ifd(0x8769).get(_EXIF_USER_COMMENT) or image.getexif().get(_EXIF_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None
