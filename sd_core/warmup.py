"""Cold-start warm-up: one tiny generation per preloaded model (SD_WARMUP), so no user request pays first-call costs."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import SDError, WorkerUnhealthy, quote
from .manifests import ModelManifest
from .refiner import ENSEMBLE
from .safety import ContentFlagged
from .schema import MIN_SIZE, GenerationRequest

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("sd_core.warmup")

PROMPT = "a photo"  # any short prompt: the text encoder, the UNet with guidance, the VAE decoder and encoding all run
STEPS = 1  # a refiner's warm-up is 2: one step of the base, one of the refiner (expert ensemble at 0.5)
SEED = 0


class WarmUpFailed(WorkerUnhealthy):
    """A preloaded model could not run its warm-up generation: this worker must not take jobs."""


class WarmUp:
    """Runs each preloaded model's main path once, through ``Engine.generate`` (the request's own stages, so what a
    first request would initialise is initialised: kernels, allocator, pipeline, scheduler, encoder, safety
    checker), at the smallest size and 1 step. Results are discarded (no user sees or counts them); each model's
    pipeline schedulers are restored afterwards and no LoRA is involved, so later images are unchanged."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.done: set[str] = set()  # models warmed by this engine (a second preload warms only new ones)

    def run(self, names: list[str]) -> dict[str, float]:
        """Warm up the models ``names`` (loaded by preload) in order; seconds per model. WarmUpFailed on failure."""
        seconds: dict[str, float] = {}
        for name in names:
            if name in self.done:
                continue
            manifest = self.engine.catalog.get(name)
            request = self.request(manifest, names)
            if request is None:
                log.info("warm-up: %s skipped (a refiner warms up with a preloaded model it refines; none is)", name)
                continue
            started = time.perf_counter()
            with self._restored([name, request.model]):
                try:
                    self.engine.generate(request)
                except ContentFlagged:
                    pass  # the safety checker ran and flagged the noise: that was its warm-up too
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, SDError) else f"{type(exc).__name__}: {str(exc)[:200]}"
                    raise WarmUpFailed(
                        f"cold start: the warm-up generation of {quote(name)} ({request.width}x{request.height}, "
                        f"{request.num_inference_steps} step(s)) failed, so this worker takes no jobs: {reason} "
                        "(SD_WARMUP=off skips the warm-up)"
                    ) from exc
            seconds[name] = time.perf_counter() - started
            self.done.add(name)
            log.info("warm-up: %s in %.2fs", name, seconds[name])
        return seconds

    def request(self, manifest: ModelManifest, names: list[str]) -> GenerationRequest | None:
        """The warm-up request of one model: txt2img at the smallest size (SD_TORCH_COMPILE: the manifest's default
        size, so the compile happens here, not in a user's request), 1 step, its default sampler and guidance
        (an inpainting model's: inpaint, all masked); a refiner's is an expert-ensemble request of a preloaded model
        it refines (None if there is none)."""
        size = MIN_SIZE  # the least side a request may ask for (64, a multiple of the VAE's factor 8): every family
        width = height = size
        if self.engine.settings.torch_compile:  # compiled for the size requests will use (the manifest's default)
            width, height = manifest.defaults.width or size, manifest.defaults.height or size
        common = {"prompt": PROMPT, "width": width, "height": height, "num_inference_steps": STEPS, "seed": SEED}
        if not manifest.family.refines:
            # a 9-channel UNet, FLUX.1 Fill: inpaint is their main path (Fill runs nothing else)
            if self._inpainting(manifest.name) or "txt2img" not in manifest.family.modes:
                gray, white = _png(width, height, 128), _png(width, height, 255)
                return GenerationRequest(model=manifest.name, image=gray, mask=white, strength=1.0, **common)
            return GenerationRequest(model=manifest.name, **common)
        bases = [n for n in names if self.engine.catalog.get(n).family.name in manifest.family.refines]
        if not bases:
            return None
        return GenerationRequest(model=bases[0], **{**common, "num_inference_steps": 2}, refine=ENSEMBLE,
                                 refiner=manifest.name, high_noise_frac=0.5)

    def _inpainting(self, name: str) -> bool:
        """Whether the loaded model ``name`` has an inpainting UNet (latents + mask + masked image: 9 channels)."""
        if name not in self.engine.pool:
            return False
        unet = getattr(self.engine.pool.get(name).pipeline("txt2img"), "unet", None)
        return unet is not None and unet.config.in_channels == 9

    @contextlib.contextmanager
    def _restored(self, names: list[str]) -> Iterator[None]:
        """Each loaded model's pipelines get back the scheduler they had before the warm-up."""
        pool = self.engine.pool
        models = [pool.get(n) for n in dict.fromkeys(names) if n in pool]
        before = {(m.name, mode): pipe.scheduler for m in models for mode, pipe in m.pipes.items()}
        try:
            yield
        finally:
            for model in models:
                for mode, pipe in model.pipes.items():
                    if (model.name, mode) in before:
                        pipe.scheduler = before[(model.name, mode)]


def _png(width: int, height: int, level: int) -> str:
    """A width x height PNG of one gray level, base64 (a request's init image or mask)."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (level, level, level)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
