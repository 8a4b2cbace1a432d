"""A1111 img2img's inpainting keys (mask blur, invert, fill, only masked, resize mode) -> GenerationRequest fields."""

from __future__ import annotations

from .errors import quote
from .limits import INPAINT_FILLS, RESIZE_MODES
from .schema import MAX_CROP_PADDING, MAX_MASK_BLUR

# A1111 1.10's API defaults (StableDiffusionProcessingImg2Img): blur 4 on both axes, fill 0 ("fill"), only masked
# ("inpaint_full_res") with 0 padding, no invert, the latent mask rounded.
DEFAULT_BLUR = 4
DEFAULT_ONLY = {"mask_round": (True,)}  # diffusers' inpainting always rounds the mask to 0 or 1 in latent space
# GenerationRequest field -> A1111 key, for error messages
FIELD_NAMES = {"mask_blur": "mask_blur_x", "mask_blur_y": "mask_blur_y", "invert_mask": "inpainting_mask_invert",
               "inpaint_fill": "inpainting_fill", "padding_mask_crop": "inpaint_full_res_padding"}


def _int(payload: dict, key: str, default: int, low: int, high: int, errors: list[str]) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) and high == 1:  # A1111 reads 0/1 switches as ints; true/false mean the same
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        errors.append(f"{key}: must be a whole number from {low} to {high} (got {quote(value)})")
        return default
    return value


def inpaint_fields(payload: dict, errors: list[str]) -> dict:
    """The GenerationRequest fields of an img2img payload's resize mode and (with a mask) inpainting keys; problems
    are appended to ``errors``. Without a mask A1111 ignores the mask keys, and so does this."""
    fields: dict = {}
    # 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)
    fields["resize_mode"] = RESIZE_MODES[_int(payload, "resize_mode", 0, 0, 3, errors)]
    if payload.get("mask") in (None, ""):
        return fields
    blur_x = _int(payload, "mask_blur_x", DEFAULT_BLUR, 0, MAX_MASK_BLUR, errors)
    blur_y = _int(payload, "mask_blur_y", DEFAULT_BLUR, 0, MAX_MASK_BLUR, errors)
    if payload.get("mask_blur") is not None:  # as A1111: mask_blur, when given, sets both axes
        blur_x = blur_y = _int(payload, "mask_blur", DEFAULT_BLUR, 0, MAX_MASK_BLUR, errors)
    fields.update(mask_blur=blur_x, mask_blur_y=blur_y if blur_y != blur_x else None, inpaint_overlay=True)
    fields["invert_mask"] = bool(_int(payload, "inpainting_mask_invert", 0, 0, 1, errors))
    fields["inpaint_fill"] = INPAINT_FILLS[_int(payload, "inpainting_fill", 0, 0, 3, errors)]
    full_res = payload.get("inpaint_full_res", True)
    if full_res not in (True, False, 0, 1):
        errors.append(f"inpaint_full_res: must be true or false (got {quote(full_res)})")
    elif full_res:
        fields["padding_mask_crop"] = _int(payload, "inpaint_full_res_padding", 0, 0, MAX_CROP_PADDING, errors)
    if payload.get("mask_round", True) not in DEFAULT_ONLY["mask_round"]:
        errors.append("mask_round: only true (A1111's default) is supported by this worker: diffusers' inpainting "
                      "rounds the mask to 0 or 1 in latent space")
    return fields
