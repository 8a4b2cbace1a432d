"""Input images (img2img init image, inpaint mask): decoding base64/data URIs/URLs safely into PIL images."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest
from .settings import Settings
from .user_downloads import download_user_url

MAX_INPUT_BYTES = 25 * 1024 * 1024  # encoded size of one input image
MAX_INPUT_PIXELS = 4096 * 4096  # decoded size: anything larger is refused before decoding (decompression bombs)
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,30}://")


def _decode_base64(value: str, field: str) -> bytes:
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(payload) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise InvalidRequest(f"image data larger than {MAX_INPUT_BYTES // 2**20} MB", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("not valid base64 image data (or an https:// URL)", field=field) from None


def read_image_bytes(value: str, field: str, settings: Settings | None = None) -> bytes:
    """The raw bytes behind an image input: a data URI, bare base64, or a URL (under the user-URL policy)."""
    if _URL_START.match(value[:64].lstrip()):  # a bounded look at the start: values can be megabytes of base64
        return download_user_url(value.strip(), field=field, max_bytes=MAX_INPUT_BYTES, settings=settings)
    return _decode_base64(value.strip(), field)


def open_image(data: bytes, field: str) -> Image.Image:
    """Decode image bytes fully, refusing oversized (bomb) and truncated/garbage data with a clear error."""
    if not data:
        raise InvalidRequest("image data is empty", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise InvalidRequest(
                    f"image is {width}x{height} pixels; the limit is {MAX_INPUT_PIXELS} pixels", field=field
                )
            image.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"image is too large to decode (limit {MAX_INPUT_PIXELS} pixels)", field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"not a readable PNG/JPEG/WebP image ({type(exc).__name__})", field=field) from None
    return image


def load_image(value: str, field: str, settings: Settings | None = None) -> Image.Image:
    """An image input value -> PIL image."""
    return open_image(read_image_bytes(value, field, settings), field)


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """An image size usable for generation: multiples of 8, scaled down to fit ``max_pixels``, at least 64."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    return max(64, int(width * scale) // 8 * 8), max(64, int(height * scale) // 8 * 8)


def prepare_init_images(
    image_value: str, mask_value: str | None, width: int | None, height: int | None, max_pixels: int,
    settings: Settings | None = None, resize_mode: str = "resize", keep_size: bool = False,
) -> tuple[Image.Image, Image.Image | None, int, int]:
    """Decode init image (+ mask), pick the output size, and bring both to it (``resize_mode``: see
    sd_core.inpainting.resize_image). The mask must match the image. ``keep_size`` (only-masked inpainting): both
    stay at their own size and width x height is the size the masked region is inpainted at."""
    image = load_image(image_value, "image", settings).convert("RGB")
    mask = None
    if mask_value is not None:
        mask = load_image(mask_value, "mask", settings).convert("L")
        if mask.size != image.size:
            raise InvalidRequest(
                f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}; they must match",
                field="mask",
            )
    if width is None or height is None:
        width, height = fit_size(width or image.width, height or image.height, max_pixels)
    if resize_mode == "latent":  # encoded at its own size, its latent resized in stage 5 (sd_core/latent_resize.py)
        from .latent_resize import check_size

        check_size(image, max_pixels)
    elif not keep_size:
        from .inpainting import resize_image  # numpy: kept off the adapters' import path

        image = resize_image(image, width, height, resize_mode)
        mask = resize_image(mask, width, height, resize_mode) if mask is not None else None
    return image, mask, width, height
