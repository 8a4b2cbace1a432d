"""ControlNet control images: none and canny (other modules: sd_core/preprocessors.py), fitted to the output size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .preprocessor_geometry import detect_padded

RESAMPLE = Image.Resampling.LANCZOS
MAX_PROCESSOR_PIXELS = 2048 * 2048  # the most pixels a preprocessor works on


def fit(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """``image`` at exactly width x height: ``just_resize`` stretches it, ``crop_and_resize`` scales it to cover the
    size and crops the middle, ``resize_and_fill`` scales it to fit inside and pads with black (A1111's three modes)."""
    if image.size == (width, height):
        return image
    if resize_mode == "crop_and_resize":
        return ImageOps.fit(image, (width, height), method=RESAMPLE)
    if resize_mode == "resize_and_fill":
        return ImageOps.pad(image, (width, height), method=RESAMPLE, color=(0, 0, 0))
    return image.resize((width, height), RESAMPLE)


def at_resolution(image: Image.Image, short_side: int) -> Image.Image:
    """``image`` scaled so that its short side is ``short_side`` (a preprocessor's working resolution), but never
    past MAX_PROCESSOR_PIXELS (a long thin image would otherwise grow without bound)."""
    scale = min(short_side / min(image.size), (MAX_PROCESSOR_PIXELS / (image.width * image.height)) ** 0.5)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, RESAMPLE)


def control_image(image: Image.Image, *, width: int, height: int, preprocessor: str, resize_mode: str,
                  processor_res: int | None = None, low: int = 100, high: int = 200,
                  preprocessors=None, options: dict | None = None) -> Image.Image:
    """The control map the ControlNet sees, at the output size: the image itself (``none``), its Canny edges or
    another module's map (``preprocessors``: sd_core.preprocessors.Preprocessors), detected at ``processor_res``
    (short side; None: at the output size) with the module's slider ``options``, then fitted to the output size."""
    return fit(detected_map(image, width=width, height=height, preprocessor=preprocessor, resize_mode=resize_mode,
                            processor_res=processor_res, low=low, high=high, preprocessors=preprocessors,
                            options=options),
               width, height, resize_mode)


def detected_map(image: Image.Image, *, width: int, height: int, preprocessor: str, resize_mode: str,
                 processor_res: int | None = None, low: int = 100, high: int = 200,
                 preprocessors=None, options: dict | None = None) -> Image.Image:
    """The preprocessor's output before it is fitted to a pass's size (a hires fix fits it to both of its sizes)."""
    image = image.convert("RGB")
    if preprocessor == "none":
        return image
    if processor_res is None:
        image, processor_res = fit(image, width, height, resize_mode), min(width, height)
    elif image.width * image.height * (processor_res / min(image.size)) ** 2 > MAX_PROCESSOR_PIXELS:
        image = at_resolution(image, processor_res)  # a long thin image: bounded before the module sees it
        processor_res = min(image.size)
    if preprocessor == "canny":  # the extension's geometry too: resized, padded to multiples of 64, unpadded
        edges = detect_padded(lambda padded, _: canny(padded, low, high), np.asarray(image), processor_res)
        return Image.fromarray(edges).convert("RGB")
    return preprocessors.run(preprocessor, image, processor_res, options=options)


def canny(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges of an RGB uint8 image as OpenCV's ``cv2.Canny(image, low, high)`` computes them (3x3 Sobel per
    channel, the channel with the largest L1 gradient, non-maximum suppression, hysteresis with 8-connectivity):
    a uint8 map, 255 on edges. Written with numpy/scipy (no OpenCV dependency); edges can differ from OpenCV's in a
    few pixels where the two break ties differently."""
    from scipy import ndimage

    channels = rgb.astype(np.float32).reshape(*rgb.shape[:2], -1)
    gx = np.stack([ndimage.sobel(channels[..., c], axis=1, mode="reflect") for c in range(channels.shape[2])], -1)
    gy = np.stack([ndimage.sobel(channels[..., c], axis=0, mode="reflect") for c in range(channels.shape[2])], -1)
    magnitude_all = np.abs(gx) + np.abs(gy)
    best = magnitude_all.argmax(axis=2)[..., None]
    gx = np.take_along_axis(gx, best, 2)[..., 0]
    gy = np.take_along_axis(gy, best, 2)[..., 0]
    magnitude = np.take_along_axis(magnitude_all, best, 2)[..., 0]
    # Non-maximum suppression along the gradient direction, quantised to 0, 45, 90 and 135 degrees.
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    tan22 = np.tan(np.deg2rad(22.5))
    horizontal = ay <= ax * tan22  # gradient along x: compare left and right
    vertical = ax <= ay * tan22
    diagonal = ~(horizontal | vertical)
    same_sign = (gx * gy) > 0
    keep = np.zeros_like(magnitude, dtype=bool)
    keep |= horizontal & (magnitude > shifted(0, -1)) & (magnitude >= shifted(0, 1))
    keep |= vertical & (magnitude > shifted(-1, 0)) & (magnitude >= shifted(1, 0))
    down_right = diagonal & same_sign
    keep |= down_right & (magnitude > shifted(-1, -1)) & (magnitude >= shifted(1, 1))
    down_left = diagonal & ~same_sign
    keep |= down_left & (magnitude > shifted(-1, 1)) & (magnitude >= shifted(1, -1))
    candidates = keep & (magnitude > low)
    strong = candidates & (magnitude > high)
    # Hysteresis: weak edge pixels survive when 8-connected (through candidates) to a strong one.
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(magnitude.shape, dtype=np.uint8)
    linked = np.zeros(count + 1, dtype=bool)
    linked[np.unique(labels[strong])] = True
    linked[0] = False
    return np.where(linked[labels], 255, 0).astype(np.uint8)
