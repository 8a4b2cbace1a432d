"""ComfyUI input images: the job's named images (read and decoded once each) and the masks LoadImage nodes give."""

from __future__ import annotations

import base64
import io

from .comfy_graph import Graph, Node
from .errors import InvalidRequest, quote
from .input_images import open_image, read_image_bytes

MAX_IMAGES = 8  # named input images one job may carry
_CHANNELS = {"red": 0, "green": 1, "blue": 2, "alpha": 3}


class NamedImages:
    """The job's ``images`` ([{"name": ..., "image": base64 or URL}]) by name, for its LoadImage nodes."""

    def __init__(self, images, settings=None):
        self.named = _named_images(images)
        self.settings = settings
        self._decoded: dict[str, tuple[bytes, object]] = {}

    def load(self, load: Node) -> tuple[bytes, object]:
        """The bytes and decoded PIL image a LoadImage / LoadImageMask node names (read and decoded once)."""
        name = load.inputs["image"]
        if name not in self.named:
            listed = ", ".join(quote(n, 40) for n in list(self.named)[:MAX_IMAGES]) or "none"
            raise load.error(f"image {quote(name, 60)} is not among the job's images (named: {listed})")
        if name not in self._decoded:
            field = f"images.{quote(name, 40)}"
            data = read_image_bytes(self.named[name], field, self.settings)
            self._decoded[name] = (data, open_image(data, field))
        return self._decoded[name]


def mask_image(graph: Graph, images: NamedImages, node: Node) -> str:
    """The MASK wired into ``node`` as the engine's mask image (white = repaint), a base64 PNG."""
    source, index = graph.source(node, "mask")
    if source.class_type == "LoadImage":  # output 1: the inverted alpha channel
        channel = "alpha"
    elif source.class_type == "LoadImageMask":
        channel = source.inputs["channel"]
        if channel not in _CHANNELS:
            raise source.error(f"channel must be one of {', '.join(_CHANNELS)}, got {quote(channel)}")
    else:
        raise node.error(f"its mask must come from a LoadImage or LoadImageMask, not from {source.label}")
    _, image = images.load(source)
    if channel == "alpha":
        if "A" not in image.getbands():
            raise source.error("the image has no alpha channel to take the mask from")
        from PIL import ImageOps

        mask = ImageOps.invert(image.getchannel("A"))  # ComfyUI: mask = 1 - alpha (transparent = repaint)
    else:
        mask = image.convert("RGBA").getchannel(_CHANNELS[channel])
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _named_images(images) -> dict[str, str]:
    """The job's ``images``: [{"name": ..., "image": base64 or URL}] -> name -> value."""
    if images is None:
        return {}
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise InvalidRequest(f"expected a list of at most {MAX_IMAGES} {{\"name\", \"image\"}} objects",
                             field="images")
    named = {}
    for index, entry in enumerate(images):
        if not isinstance(entry, dict) or set(entry) != {"name", "image"} or not all(
                isinstance(v, str) for v in entry.values()) or not 0 < len(entry["name"]) <= 200:
            raise InvalidRequest(f"images[{index}]: expected {{\"name\": \"<file name>\", \"image\": \"<base64 or "
                                 "URL>\"}}", field="images")
        if entry["name"] in named:
            raise InvalidRequest(f"images[{index}]: duplicate name {quote(entry['name'])}", field="images")
        named[entry["name"]] = entry["image"]
    return named
