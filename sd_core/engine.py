"""The Engine: one GenerationRequest in, one GenerationResult out, over cached pipelines."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .device import choose_placement, free_memory, is_fatal_device_error, is_out_of_memory
from .errors import Cancelled, InvalidRequest, OutOfMemory, WorkerUnhealthy
from .images import prepare_init_images
from .models import ModelCatalog, ModelManifest, fetch_model
from .outputs import encode_image, infotext
from .pipelines import LoadedModel, PipelinePool, load_pipeline
from .schema import MAX_SEED, GenerationRequest, GenerationResult, resolve_seed
from .settings import Settings

log = logging.getLogger("sd_core.engine")

StepCallback = Callable[[int, int], None]  # (steps done, steps total)
CancelCheck = Callable[[], bool]


class Engine:
    """Holds the model catalog and loaded pipelines of one worker; thread-safe, one generation at a time."""

    def __init__(self, settings: Settings | None = None, catalog: ModelCatalog | None = None):
        self.settings = settings or Settings.from_env()
        self.catalog = catalog or ModelCatalog.from_dir(self.settings.models_dir)
        self.placement = choose_placement(self.settings)
        self.pool = PipelinePool(self.settings, self.placement, self._load)
        self._gpu_lock = threading.Lock()

    # --- models ---------------------------------------------------------------------------------------------
    def _load(self, name: str) -> LoadedModel:
        local = fetch_model(self.catalog.get(name), self.settings)
        return load_pipeline(local, self.settings, self.placement)

    def preload(self) -> dict[str, float]:
        """Cold start: fetch and load every model named by SD_PRELOAD_MODELS. Returns seconds per model."""
        timings = {}
        for name in self.settings.models_to_preload:
            started = time.perf_counter()
            manifest = self.catalog.get(name)
            self.pool.get(name, expected_bytes=manifest.size or 0)
            timings[name] = time.perf_counter() - started
            log.info("ready: %s in %.2fs", name, timings[name])
        return timings

    # --- generation -----------------------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> tuple[ModelManifest, GenerationRequest]:
        """Fill the request's empty parameters from its model's manifest defaults, and check the pixel budget."""
        manifest = self.catalog.get(request.model or self.settings.default_model)
        defaults = manifest.defaults
        filled = request.model_copy(update={
            "model": manifest.name,
            "width": request.width or (None if request.image else defaults.width),
            "height": request.height or (None if request.image else defaults.height),
            "num_inference_steps": request.num_inference_steps or defaults.num_inference_steps,
            "guidance_scale": defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            "scheduler": request.scheduler or defaults.scheduler,
        })
        return manifest, filled

    def _check_pixel_budget(self, width: int, height: int, count: int) -> None:
        if width * height * count > self.settings.max_pixels:
            raise InvalidRequest(
                f"{count} x {width}x{height} = {width * height * count} pixels exceeds this worker's budget of "
                f"{self.settings.max_pixels} pixels (SD_MAX_PIXELS); ask for fewer or smaller images",
                field="num_outputs",
            )

    def generate(
        self, request: GenerationRequest, *, on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Run one request end to end: defaults, input images, model, scheduler, denoising, encoding."""
        started = time.perf_counter()
        manifest, req = self.resolve(request)
        if req.loras:
            raise InvalidRequest("LoRAs are not supported by this engine build", field="loras")
        image = mask = None
        width, height = req.width, req.height
        if req.image is not None:
            image, mask, width, height = prepare_init_images(
                req.image, req.mask, width, height, self.settings.max_pixels
            )
        self._check_pixel_budget(width, height, req.num_outputs)
        first_seed = resolve_seed(req.seed)
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(req.num_outputs)]
        timings: dict[str, float] = {}

        with self._gpu_lock:
            t = time.perf_counter()
            model = self.pool.get(manifest.name, expected_bytes=manifest.size or 0)
            timings["load_s"] = time.perf_counter() - t
            pipe = model.pipeline(req.mode)
            pipe.scheduler = model.scheduler(req.scheduler)
            t = time.perf_counter()
            pil_images = self._run(pipe, req, seeds, width, height, image, mask, on_step, should_cancel)
            timings["inference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        strength = req.strength if req.image is not None else None

        def parameters(seed: int) -> str:
            return infotext(
                prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.num_inference_steps,
                sampler=req.scheduler, cfg_scale=req.guidance_scale, seed=seed, width=width, height=height,
                model=manifest.name, strength=strength,
            )

        encoded = [
            encode_image(pil, fmt=req.output_format, quality=req.output_quality, parameters=parameters(seed), seed=seed)
            for seed, pil in zip(seeds, pil_images, strict=True)
        ]
        timings["encode_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started
        return GenerationResult(images=encoded, seeds=seeds, model=manifest.name, parameters=parameters(seeds[0]),
                                timings=timings)

    def _run(self, pipe, req, seeds, width, height, image, mask, on_step, should_cancel):
        import torch

        count = len(seeds)
        kwargs = {
            "prompt": [req.prompt] * count,
            "negative_prompt": [req.negative_prompt] * count,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            # CPU generators: the same seed gives the same image on every device.
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        if req.mode == "txt2img":
            kwargs.update(width=width, height=height)
        else:
            kwargs.update(image=image, strength=req.strength)
        if req.mode == "inpaint":
            kwargs.update(mask_image=mask, width=width, height=height)
        total = _steps_run(req)

        def step_end(pipeline, step, timestep, callback_kwargs):
            if should_cancel is not None and should_cancel():
                raise Cancelled("generation cancelled")
            if on_step is not None:
                on_step(step + 1, total)
            return callback_kwargs

        kwargs["callback_on_step_end"] = step_end
        try:
            with torch.inference_mode():
                return pipe(**kwargs).images
        except Exception as exc:
            if is_out_of_memory(exc):
                free_memory(self.placement)
                raise OutOfMemory(
                    "ran out of memory during generation; try fewer or smaller images", field="num_outputs"
                ) from None
            if is_fatal_device_error(exc):
                raise WorkerUnhealthy(f"device error, this worker must be replaced: {exc}") from exc
            raise


def _steps_run(req: GenerationRequest) -> int:
    """Denoising steps actually run: img2img/inpaint skip the first (1 - strength) of the schedule."""
    if req.mode == "txt2img":
        return req.num_inference_steps
    return max(1, int(req.num_inference_steps * req.strength))
