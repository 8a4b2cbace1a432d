"""Upscalers: A1111's non-model ones (None, Lanczos, Nearest) and ESRGAN-family models run by spandrel, tiled."""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from . import storage
from .checkpoints import refuse_pickle
from .device import raise_device_failure
from .errors import Cancelled, InvalidRequest, ManifestError, quote, scrub
from .manifests import NAME_PATTERN, SHA256_PATTERN, read_manifest, resolve_uri
from .settings import Settings

log = logging.getLogger("sd_core.upscalers")

MANIFEST_NAME = "_upscalers.yaml"  # in SD_MODELS_DIR; absent: only the non-model upscalers
NONE, LANCZOS, NEAREST = "None", "Lanczos", "Nearest"
RESAMPLERS = (NONE, LANCZOS, NEAREST)  # A1111 lists these first, in this order
MAX_PASSES = 3  # model passes at most (as A1111): a x2 model reaches x8, then Lanczos does the rest
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


class UpscalerEntry(BaseModel):
    """One model upscaler: a single weights file spandrel can load (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ...)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,99}$", description="as requests and A1111 name it")
    uri: str = Field(min_length=1, description="the weights file (relative: joined onto SD_WEIGHTS_URI)")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    scale: int = Field(ge=1, le=16, description="the model's native scale (checked when it loads)")
    description: str = ""


class UpscalerManifest(BaseModel):
    """models/_upscalers.yaml: the worker's model upscalers."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("upscalers", pattern=NAME_PATTERN)
    description: str = ""
    upscalers: list[UpscalerEntry] = Field(default_factory=list)


def import_spandrel():
    """spandrel, imported. It imports torchvision at module level for two architectures this worker never runs
    (LaMa, RestoreFormer); where torchvision is not installed, a stand-in is in place for that import only."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stand_in = importlib.util.find_spec("torchvision") is None
    if stand_in:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        functional = sys.modules[names[2]]
        functional.InterpolationMode = type("InterpolationMode", (), {})
        functional.rotate = functional.normalize = _needs_torchvision
    try:
        import spandrel
    finally:
        if stand_in:
            for name in names:
                sys.modules.pop(name, None)
    return spandrel


def _needs_torchvision(*args, **kwargs):
    raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")


def _resize(image, width: int, height: int, name: str):
    from PIL import Image

    if image.size == (width, height):
        return image
    method = Image.Resampling.NEAREST if name == NEAREST else Image.Resampling.LANCZOS
    return image.resize((width, height), method)


class Upscalers:
    """One worker's upscalers (``engine.upscalers``): ``names()``, ``upscale(name, images, width, height)``.

    Model upscalers are fetched like weights, loaded on first use (at most SD_UPSCALERS_MAX_LOADED, least recently
    used unloaded first) and run tile by tile under the engine's GPU lock, so memory stays bounded at any size.
    """

    def __init__(self, settings: Settings, placement, gpu_lock: AbstractContextManager | None = None):
        self.settings = settings
        self.placement = placement
        self.gpu_lock = gpu_lock if gpu_lock is not None else threading.RLock()
        self.entries = self._read_entries()
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._load_lock = threading.Lock()

    def _read_entries(self) -> dict[str, UpscalerEntry]:
        path = Path(self.settings.models_dir) / MANIFEST_NAME
        if not path.is_file():
            return {}
        manifest = read_manifest(path, UpscalerManifest, "upscaler manifest")
        entries: dict[str, UpscalerEntry] = {}
        for entry in manifest.upscalers:
            if entry.name in entries or entry.name in RESAMPLERS:
                raise ManifestError(f"upscaler name {entry.name!r} is defined twice (or is a built-in) in {path}")
            if not entry.uri.lower().endswith(WEIGHT_SUFFIXES):
                raise ManifestError(f"upscaler {entry.name!r} in {path}: uri must name one weights file "
                                    f"({', '.join(WEIGHT_SUFFIXES)})")
            entries[entry.name] = entry
        return entries

    def names(self) -> list[str]:
        """Every upscaler a request may name: None, Lanczos, Nearest, then the models in manifest order."""
        return [*RESAMPLERS, *self.entries]

    def check(self, name: str, field: str = "upscaler") -> str:
        """``name`` if this worker has that upscaler, else InvalidRequest listing the valid ones."""
        if isinstance(name, str) and (name in RESAMPLERS or name in self.entries):
            return name
        raise InvalidRequest(f"unknown upscaler {quote(name)}; valid: {', '.join(self.names())}", field=field)

    def scale(self, name: str) -> int | None:
        """A model upscaler's native scale; None for the non-model ones."""
        entry = self.entries.get(name)
        return entry.scale if entry is not None else None

    def upscale(self, name: str, images: list, width: int, height: int,
                should_cancel: Callable[[], bool] | None = None) -> list:
        """``images`` (PIL) upscaled with ``name`` to exactly ``width`` x ``height``.

        None and Lanczos/Nearest: one PIL resize (None: Lanczos, only when the size differs, as A1111). A model: run
        at its native scale until the image covers the target size (at most 3 passes), then Lanczos to the size.
        """
        self.check(name)
        if name in RESAMPLERS:
            return [_resize(image, width, height, name) for image in images]
        return [self._upscale_model(name, image, width, height, should_cancel) for image in images]

    def _upscale_model(self, name: str, image, width: int, height: int, should_cancel) -> object:
        image = image.convert("RGB")
        for _ in range(MAX_PASSES):
            if image.width >= width and image.height >= height:
                break
            model = self._model(name)
            with self.gpu_lock:
                image = self._run(model, image, should_cancel)
        return _resize(image, width, height, LANCZOS)

    def _model(self, name: str):
        """The loaded spandrel model for ``name`` (fetched and loaded on first use; LRU-bounded)."""
        with self._load_lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            entry = self.entries[name]
            path = storage.fetch(resolve_uri(entry.uri, self.settings), self.settings, sha256=entry.sha256)
            model = self._load(entry, Path(path))
            self._loaded[name] = model
            while len(self._loaded) > max(1, self.settings.upscalers_max_loaded):
                evicted, _ = self._loaded.popitem(last=False)
                log.info("upscaler %s unloaded (SD_UPSCALERS_MAX_LOADED)", evicted)
            return model

    def _load(self, entry: UpscalerEntry, path: Path):
        refuse_pickle(path, self.settings)  # .pth & co only with SD_ALLOW_PICKLE=1; a fake .safetensors never
        spandrel = import_spandrel()
        where = scrub(entry.uri)
        try:
            descriptor = spandrel.ModelLoader().load_from_file(path)
        except Exception as exc:  # not a model spandrel knows, or a damaged file
            raise ManifestError(f"upscaler {entry.name!r} ({where}): cannot load it ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale != entry.scale:
            got = getattr(descriptor, "scale", None)
            raise ManifestError(f"upscaler {entry.name!r} ({where}): not a x{entry.scale} image upscaler "
                                f"({descriptor.architecture.name}, scale {got})")
        dtype = self.placement.dtype
        if (dtype.is_floating_point and dtype.itemsize == 2 and not descriptor.supports_half) or \
                str(self.placement.device) == "cpu":
            dtype = __import__("torch").float32
        descriptor.to(self.placement.device, dtype).eval()
        log.info("upscaler %s loaded (%s x%d)", entry.name, descriptor.architecture.name, descriptor.scale)
        return descriptor

    def _run(self, model, image, should_cancel):
        """One model pass over ``image``, tile by tile (SD_UPSCALER_TILE, SD_UPSCALER_TILE_OVERLAP; 0 = whole)."""
        try:
            return run_tiled(model, image, self.settings.upscaler_tile, self.settings.upscaler_tile_overlap,
                             should_cancel)
        except Cancelled:
            raise
        except Exception as exc:
            raise_device_failure(exc, self.placement, "ran out of memory in the upscaler; try a smaller "
                                 "SD_UPSCALER_TILE", field="upscaler")
            raise


def tiles(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most ``tile`` covering ``length`` (the whole when ``tile`` is 0)."""
    if tile <= 0 or tile >= length:
        return [(0, length)]
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def run_tiled(model, image, tile: int, overlap: int, should_cancel=None):
    """``model`` (a spandrel ImageModelDescriptor) over a PIL image, tile x tile pixels at a time, each tile run with
    ``overlap`` pixels of context on every side that are cropped off its output: with an overlap at least the
    model's receptive radius, the result equals one run over the whole image. Output assembled as uint8."""
    import numpy as np
    import torch
    from PIL import Image

    parameter = next(model.model.parameters())
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8, on the CPU
    height, width = pixels.shape[1:]
    scale = model.scale
    out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    with torch.inference_mode():
        for top, bottom in tiles(height, tile):
            for left, right in tiles(width, tile):
                if should_cancel is not None and should_cancel():
                    raise Cancelled("upscale cancelled")
                y0, y1 = max(0, top - overlap), min(height, bottom + overlap)
                x0, x1 = max(0, left - overlap), min(width, right + overlap)
                piece = pixels[:, y0:y1, x0:x1].unsqueeze(0).to(parameter.device, parameter.dtype) / 255.0
                result = model(piece)[0]
                result = result[:, (top - y0) * scale:(bottom - y0) * scale, (left - x0) * scale:(right - x0) * scale]
                result = (result.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
                out[top * scale:bottom * scale, left * scale:right * scale] = result.cpu().numpy()
    return Image.fromarray(out)
