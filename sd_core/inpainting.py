"""Inpainting and outpainting details (stage 2 and the overlay post-pass): mask blur/invert, only-masked crops,
masked-area fills (A1111's inpainting_fill), resize modes, the outpaint canvas; and A1111's latent fills (stage 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .limits import INPAINT_FILLS, RESIZE_MODES  # noqa: F401 - re-exported

OUTPAINT_OVERLAP = 8  # pixels of the original image, along each grown side, repainted with the new area
# The fill cascade (blur radius, times composited): the masked area takes the colours around it, coarse to fine.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def _processor():
    from diffusers.image_processor import VaeImageProcessor  # imported by then: the pipelines use it

    return VaeImageProcessor()


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """An init image (or mask) at width x height: "resize" stretches, "crop" scales to cover and cuts the overflow
    (centred), "fill" scales to fit and fills the rest with the stretched edges (A1111's resize modes 0-2, which are
    diffusers' resize modes "default", "crop", "fill")."""
    if image.size == (width, height):
        return image
    if mode == "resize":  # masks too: Lanczos, as A1111 and diffusers' mask processor resize them
        return image.resize((width, height), Image.Resampling.LANCZOS)
    out = _processor().resize(image, height=height, width=width, resize_mode=mode)
    return out.convert(image.mode)


def gaussian_blur(mask: Image.Image, sigma_x: int, sigma_y: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of std sigma per axis, kernel 2 * int(2.5 * sigma + 0.5) + 1 taps, mirrored
    edges (OpenCV's default border), each axis on its own; rounded to whole levels."""
    from scipy.ndimage import correlate1d  # "mirror" is OpenCV's default border (reflect, edge not repeated)

    values = np.asarray(mask.convert("L"), dtype=np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma > 0:
            half = int(2.5 * sigma + 0.5)
            taps = np.exp(-(np.arange(-half, half + 1) ** 2) / (2.0 * sigma * sigma))
            values = correlate1d(values, taps / taps.sum(), axis=axis, mode="mirror")
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0: the masked area painted with the colours around it (the unmasked image, blurred at
    decreasing radii and stacked, coarse under fine); unmasked pixels stay as they are."""
    keep = ImageOps.invert(mask.convert("L"))
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=keep)  # premultiplied: blurs carry no masked colour
    painted = Image.new("RGBA", image.size)
    for radius, times in _FILL_PASSES:
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            painted.alpha_composite(layer)
    return painted.convert("RGB")


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int
                    ) -> tuple[Image.Image, Image.Image]:
    """The grown canvas (new area filled from the edges' colours) and its mask: white over the new area and
    OUTPAINT_OVERLAP pixels into the image along each grown side, black elsewhere."""
    width, height = image.width + left + right, image.height + top + bottom
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (left, top))
    mask = Image.new("L", (width, height), 255)
    inner = (left + (OUTPAINT_OVERLAP if left else 0), top + (OUTPAINT_OVERLAP if top else 0),
             left + image.width - (OUTPAINT_OVERLAP if right else 0),
             top + image.height - (OUTPAINT_OVERLAP if bottom else 0))
    mask.paste(0, inner)
    known = Image.new("L", (width, height), 255)
    known.paste(0, (left, top, left + image.width, top + image.height))
    return fill_masked(canvas, known), mask


@dataclass
class InpaintPlan:
    """What the overlay post-pass needs: the image to paste into, where, and through which mask."""

    original: Image.Image  # the init image (or outpaint canvas) at the output size
    overlay_mask: Image.Image | None  # white: the generated pixels; None: no overlay
    crop: tuple[int, int, int, int] | None = None  # only-masked: the region inpainted at width x height


def prepare(req, image: Image.Image, mask: Image.Image | None, width: int, height: int
            ) -> tuple[Image.Image, Image.Image | None, int, int, InpaintPlan | None]:
    """Stage 2 for inpainting: outpaint canvas, mask invert and blur, only-masked crop, masked-area fill.
    Returns what the pipeline gets (image, mask, width, height) and the overlay plan (None: no post-pass)."""
    if req.outpaint is not None:
        o = req.outpaint
        image, mask = outpaint_canvas(image, o.left, o.right, o.top, o.bottom)
        width, height = image.size
    if mask is None:
        return image, None, width, height, None
    if req.invert_mask:
        mask = ImageOps.invert(mask)
    blur_y = req.mask_blur if req.mask_blur_y is None else req.mask_blur_y
    if req.mask_blur or blur_y:
        mask = gaussian_blur(mask, req.mask_blur, blur_y)
    original, crop = image, None
    if req.padding_mask_crop is not None and mask.getbbox() is not None:  # an empty mask: the whole picture
        processor = _processor()
        crop = processor.get_crop_region(mask, width, height, pad=req.padding_mask_crop)
        image = processor.resize(image.crop(crop), height=height, width=width, resize_mode="fill")
        work_mask = processor.resize(mask.crop(crop), height=height, width=width, resize_mode="fill").convert("L")
        plan = InpaintPlan(original, mask, crop)  # pasted back as diffusers' padding_mask_crop does
    else:
        work_mask = mask
        # A1111 overlays the whole picture through the mask doubled (half-masked pixels are all generated)
        doubled = mask.point(lambda v: min(255, 2 * v)) if req.inpaint_overlay else None
        plan = InpaintPlan(original, doubled) if doubled is not None else None
    if req.inpaint_fill == "fill":
        image = fill_masked(image, work_mask)
    return image, work_mask, width, height, plan


def overlay_pass(job, images: list) -> list:
    """Stage 6: generated images pasted into the original through the overlay mask (only-masked crops go back to
    their place, the original image kept outside the mask)."""
    plan = job.inpaint
    if plan is None or plan.overlay_mask is None:
        return images
    processor = _processor()
    return [processor.apply_overlay(plan.overlay_mask, plan.original, image, plan.crop) for image in images]


def latent_fill_kwargs(pipe, job) -> dict[str, Any]:
    """A1111's inpainting_fill 2/3 as inpaint-pipeline arguments: the init image's latents with the masked area
    replaced by unit noise (one draw per image seed) or by zeros, given as ``image`` (diffusers takes 4-channel
    latents as they are, then noises them for the strength); ``masked_image_latents`` is the masked original for
    inpainting UNets (9 channels). {} for the other fills."""
    fill = job.request.inpaint_fill
    if fill not in ("latent_noise", "latent_nothing"):
        return {}
    import torch

    device, dtype = pipe._execution_device, pipe.vae.dtype
    count = len(job.seeds)
    pixels = pipe.image_processor.preprocess(job.image, height=job.height, width=job.width)
    pixels = pixels.to(device=device, dtype=dtype).repeat(count, 1, 1, 1)

    def encode(batch):  # the latent sample diffusers would draw first from each image's generator
        generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        return pipe._encode_vae_image(batch, generator=generators)

    latents = encode(pixels)
    size = (latents.shape[3], latents.shape[2])
    weights = np.around(np.asarray(job.mask.convert("L").resize(size, Image.Resampling.BICUBIC), np.float32) / 255)
    masked = torch.from_numpy(weights)[None, None].to(device=device, dtype=latents.dtype)
    latents = latents * (1 - masked)
    if fill == "latent_noise":
        noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(s))
                           for s in job.seeds])
        latents = latents + noise.to(device=device, dtype=latents.dtype) * masked
    conditioning = latents
    if pipe.unet.config.in_channels == 9:  # inpainting UNets also see the original with the masked area blanked
        keep = pipe.mask_processor.preprocess(job.mask, height=job.height, width=job.width) < 0.5
        conditioning = encode(pixels * keep.to(device=device, dtype=dtype))
    return {"image": latents, "masked_image_latents": conditioning}
