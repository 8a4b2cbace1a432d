"""The A1111 ControlNet extension's preprocessor geometry: short side to the resolution, edge-padded to 64, unpadded."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MULTIPLE = 64  # the extension pads both sides of a preprocessor's input up to a multiple of this


def padded(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``pixels`` (H x W x C uint8) scaled so that its short side is ``resolution`` (each side ``round(side * k)``;
    cubic up, area down, none at the same size), then edge-padded on the bottom and right to multiples of 64; and the
    unpadded (height, width): the extension's resize_image_with_pad."""
    import cv2

    height, width = pixels.shape[:2]
    k = resolution / min(height, width)
    target_h, target_w = int(np.round(height * k)), int(np.round(width * k))
    resized = cv2.resize(pixels, (target_w, target_h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    if resized.ndim == 2:
        resized = resized[..., None]
    pad_h, pad_w = -target_h % MULTIPLE, -target_w % MULTIPLE
    return np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge"), (target_h, target_w)


def detect_padded(detect: Callable[[np.ndarray, int], np.ndarray], pixels: np.ndarray,
                  resolution: int) -> np.ndarray:
    """``detect(image, side)``'s map of ``pixels`` as the extension makes it: the detector runs on the padded image
    (``side``: its short side, so that a detector that scales its input to ``side`` in multiples of 64, as
    controlnet_aux's do, leaves it as it is) and its map is cropped back to the unpadded size (remove_pad)."""
    image, (height, width) = padded(pixels, resolution)
    result = np.asarray(detect(image, min(image.shape[:2])))
    if result.shape[:2] != image.shape[:2]:
        raise ValueError(f"the detector changed the padded size {image.shape[:2]} to {result.shape[:2]}")
    return np.ascontiguousarray(result[:height, :width])


def scribble(edges: np.ndarray) -> np.ndarray:
    """The extension's scribble_hed / scribble_pidinet step on an (unpadded) soft-edge map: non-maximum suppression
    at 127 after a 3-pixel blur, blurred again, every pixel above 4 set (controlnet_aux's nms: the same function)."""
    import cv2

    from .preprocessors import import_controlnet_aux

    single = edges[..., 0] if edges.ndim == 3 else edges
    result = import_controlnet_aux("util").nms(single, 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result
