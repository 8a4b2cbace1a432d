"""The Engine: one GenerationRequest in, one GenerationResult out, over cached pipelines."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .batching import MicroBatcher
from .device import choose_placement, free_memory, is_fatal_device_error, is_out_of_memory
from .errors import Cancelled, InvalidRequest, OutOfMemory, WorkerUnhealthy
from .images import prepare_init_images
from .lora import TAG, LoraManager, ResolvedLora
from .models import LocalModel, ModelCatalog, ModelManifest, fetch_model
from .outputs import encode_image, infotext, lora_tag
from .pipelines import LoadedModel, PipelinePool, import_pipeline, load_pipeline
from .safety import ContentFlagged, SafetyChecker
from .schema import MAX_SEED, GenerationRequest, GenerationResult, resolve_seed
from .settings import Settings

log = logging.getLogger("sd_core.engine")

StepCallback = Callable[[int, int], None]  # (steps done, steps total)
CancelCheck = Callable[[], bool]


@dataclass
class Job:
    """A validated request ready for the GPU: defaults filled, input images decoded, seeds chosen."""

    request: GenerationRequest
    manifest: ModelManifest
    width: int
    height: int
    seeds: list[int]
    image: Any = None
    mask: Any = None
    on_step: StepCallback | None = None
    should_cancel: CancelCheck | None = None
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    loras: tuple[ResolvedLora, ...] = ()  # fetched LoRAs with their scales (request field + prompt tags)
    prompt: str = ""  # the prompt as the user gave it, <lora:...> tags included (request.prompt has them stripped)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one denoising call; img2img/inpaint (own init images) never batch.

        Empty and non-empty negative prompts never share a batch: an all-empty batch is run with no negative prompt
        (SDXL then uses a zero negative embedding, as diffusers and A1111 do; see ``_run``).
        """
        r = self.request
        if r.mode != "txt2img":
            return None
        return (r.model, self.width, self.height, r.num_inference_steps, r.scheduler, r.guidance_scale,
                tuple(lora.key for lora in self.loras), not r.negative_prompt)


class Engine:
    """Holds the model catalog and loaded pipelines of one worker; thread-safe, one generation at a time."""

    def __init__(self, settings: Settings | None = None, catalog: ModelCatalog | None = None):
        self.settings = settings or Settings.from_env()
        self.catalog = catalog or ModelCatalog.from_dir(self.settings.models_dir)
        self.placement = choose_placement(self.settings)
        self.pool = PipelinePool(self.settings, self.placement, self._load)
        self.loras = LoraManager(self.settings, self.catalog)
        self._gpu_lock = threading.Lock()
        self.batcher = MicroBatcher(self.execute, self.settings) if self.settings.max_batch_images > 1 else None
        self._fetched: dict[str, LocalModel] = {}  # fetched by preload's background thread, not loaded yet
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sd-encode")
        # SD_SAFETY_CHECKER (None, when no adapter set a platform default, means off): loaded by preload or first use.
        self.safety = SafetyChecker(self.settings, self.placement) if self.settings.safety_checker else None

    # --- models ---------------------------------------------------------------------------------------------
    def _load(self, name: str) -> LoadedModel:
        local = self._fetched.pop(name, None) or fetch_model(self.catalog.get(name), self.settings)
        return load_pipeline(local, self.settings, self.placement)

    def preload(self) -> dict[str, float]:
        """Cold start: fetch and load every model named by SD_PRELOAD_MODELS. Returns seconds per model.

        The downloads run in a background thread (in order) while diffusers is imported and earlier models load,
        so a cold start pays max(fetch, import) rather than their sum.
        """
        manifests = [self.catalog.get(name) for name in self.settings.models_to_preload]
        timings = {}
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-prefetch")
        try:
            fetches = [None if m.name in self.pool else executor.submit(fetch_model, m, self.settings)
                       for m in manifests]
            checker = self.safety if self.safety is not None and not self.safety.loaded else None
            checker_fetch = executor.submit(checker.fetch) if checker is not None else None
            started = time.perf_counter()
            for architecture in dict.fromkeys(m.architecture for m in manifests):
                import_pipeline(architecture)  # seconds of imports, overlapping the downloads
            for manifest, fetching in zip(manifests, fetches, strict=True):
                if fetching is not None:
                    self._fetched[manifest.name] = fetching.result()
                self.pool.get(manifest.name, expected_bytes=manifest.size or 0)
                self._fetched.pop(manifest.name, None)  # unused if the model was loaded already
                timings[manifest.name] = time.perf_counter() - started
                started = time.perf_counter()
                log.info("ready: %s in %.2fs", manifest.name, timings[manifest.name])
            if checker_fetch is not None:  # a checker that cannot be fetched or loaded fails the cold start
                timings["safety_checker"] = checker.load(checker_fetch.result())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
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

    def prepare(
        self, request: GenerationRequest, *, on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> Job:
        """Everything that needs no GPU: defaults, input images, pixel budget, seeds. Bad input fails here."""
        started = time.perf_counter()
        manifest, req = self.resolve(request)
        image = mask = None
        width, height = req.width, req.height
        if req.image is not None:
            image, mask, width, height = prepare_init_images(
                req.image, req.mask, width, height, self.settings.max_pixels, self.settings
            )
        self._check_pixel_budget(width, height, req.num_outputs)
        prompt = req.prompt
        req, loras = self.loras.prepare(req, manifest)  # strips <lora:...> tags; fetches outside the GPU lock
        first_seed = resolve_seed(req.seed)
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(req.num_outputs)]
        return Job(request=req, manifest=manifest, width=width, height=height, seeds=seeds, image=image, mask=mask,
                   on_step=on_step, should_cancel=should_cancel, started=started, loras=loras, prompt=prompt,
                   timings={"prepare_s": time.perf_counter() - started})

    def generate(
        self, request: GenerationRequest, *, on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Run one request end to end (micro-batched with concurrent compatible requests when enabled)."""
        with self.batcher.request() if self.batcher else contextlib.nullcontext():  # a lone request never waits
            job = self.prepare(request, on_step=on_step, should_cancel=should_cancel)
            images = self.batcher.run(job) if self.batcher else self.execute([job])[0]
            if job.should_cancel is not None and job.should_cancel():
                raise Cancelled("generation cancelled")
            images, flags = self.check_safety(job, images)
            result = self.finish(job, images)
        if flags is not None:
            result.safety_checked = True
            for image, flag in zip(result.images, flags, strict=True):
                image.nsfw = flag
        return result

    def check_safety(self, job: Job, images: list) -> tuple[list, list[bool] | None]:
        """The safety checker on one job's images, unless off for this worker or the request: flagged images come
        back black, with their flags (None: not checked). Every image flagged -> ContentFlagged."""
        if self.safety is None or job.request.disable_safety_checker:
            return images, None
        t = time.perf_counter()
        images, flags = self.safety.check(images)
        job.timings["safety_s"] = time.perf_counter() - t
        if any(flags):
            log.info("safety checker flagged %d of %d image(s)", sum(flags), len(flags))
        if all(flags):
            raise ContentFlagged(f"NSFW content detected: all {len(flags)} image(s) were flagged by the safety "
                                 "checker; try another prompt or seed")
        return images, flags

    def execute(self, jobs: list[Job]) -> list[list]:
        """Denoise one batch of compatible jobs (same model, mode, size, steps, scheduler, guidance) in one call."""
        first = jobs[0].request
        with self._gpu_lock:
            t = time.perf_counter()
            for job in jobs:  # waiting for the GPU: behind other requests, or for batch-mates
                job.timings["queue_s"] = t - job.started - job.timings.get("prepare_s", 0.0)
            model = self.pool.get(first.model, expected_bytes=jobs[0].manifest.size or 0)
            load_s = time.perf_counter() - t
            pipe = model.pipeline(first.mode)
            pipe.scheduler = model.scheduler(first.scheduler)
            t = time.perf_counter()
            # Exactly this batch's LoRA set (all jobs of a batch share it), or none: inside the lock, so no
            # request ever runs with another's adapters.
            self.loras.activate(model, jobs[0].loras, should_cancel=jobs[0].should_cancel if len(jobs) == 1 else None)
            lora_s = time.perf_counter() - t
            t = time.perf_counter()
            images = self._run(pipe, jobs)
            inference_s = time.perf_counter() - t
        results, offset = [], 0
        for job in jobs:
            job.timings.update(load_s=load_s, lora_s=lora_s, inference_s=inference_s, batch_size=len(jobs))
            results.append(images[offset:offset + len(job.seeds)])
            offset += len(job.seeds)
        return results

    def finish(self, job: Job, images: list) -> GenerationResult:
        """Encode a job's images with their infotext and assemble its result."""
        req, t = job.request, time.perf_counter()
        strength = req.strength if req.image is not None else None
        prompt, lora_hashes = _infotext_prompt(job)

        def parameters(seed: int) -> str:
            return infotext(
                prompt=prompt, negative_prompt=req.negative_prompt, steps=req.num_inference_steps,
                sampler=req.scheduler, cfg_scale=req.guidance_scale, seed=seed, width=job.width, height=job.height,
                model=req.model, model_hash=job.manifest.sha256, strength=strength, lora_hashes=lora_hashes,
            )

        def encode(item):
            seed, pil = item
            return encode_image(pil, fmt=req.output_format, quality=req.output_quality, parameters=parameters(seed),
                                seed=seed)

        items = list(zip(job.seeds, images, strict=True))
        # Pillow encodes without the GIL: several images of one request are encoded in parallel.
        encoded = list(self._encoders.map(encode, items)) if len(items) > 1 else [encode(i) for i in items]
        job.timings["encode_s"] = time.perf_counter() - t
        job.timings["total_s"] = time.perf_counter() - job.started
        return GenerationResult(images=encoded, seeds=job.seeds, model=req.model,
                                parameters=parameters(job.seeds[0]), timings=job.timings,
                                request=req.model_copy(update={"prompt": job.prompt or req.prompt}))

    def _run(self, pipe, jobs: list[Job]) -> list:
        import torch

        req, first = jobs[0].request, jobs[0]
        seeds = [s for j in jobs for s in j.seeds]
        negative = [j.request.negative_prompt for j in jobs for _ in j.seeds]
        kwargs = {
            "prompt": [j.request.prompt for j in jobs for _ in j.seeds],
            # None when all are empty: SDXL (force_zeros_for_empty_prompt) then zeros the negative embedding, as
            # bare diffusers and A1111 do; SD1.5 encodes "" either way. batch_key keeps empty/non-empty apart.
            "negative_prompt": negative if any(negative) else None,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            # One CPU generator per image, so image i's initial (and ancestral) noise depends only on its own seed,
            # on every device. The same request alone gives the same pixels every time; in a batch (micro-batching,
            # num_outputs > 1) kernels that depend on the batch size may move a few pixels by 1-2 levels.
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
            "output_type": "pil",
        }
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            # DPM++ SDE's Brownian noise: one tree per image seeded with its own seed (as A1111 does), instead of
            # torch's global RNG. set_timesteps() drops the previous run's trees.
            pipe.scheduler.noise_sampler_seed = seeds
        if req.mode == "txt2img":
            kwargs.update(width=first.width, height=first.height)
        else:
            kwargs.update(image=first.image, strength=req.strength)
        if req.mode == "inpaint":
            kwargs.update(mask_image=first.mask, width=first.width, height=first.height)
        total = _steps_run(req)

        def step_end(pipeline, step, timestep, callback_kwargs):
            cancels = [j.should_cancel() if j.should_cancel else False for j in jobs]
            if all(cancels):
                raise Cancelled("generation cancelled")
            for job in jobs:
                if job.on_step is not None:
                    job.on_step(step + 1, total)
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


def _infotext_prompt(job: Job) -> tuple[str, dict[str, str]]:
    """The prompt as A1111 writes it, and its `Lora hashes` ({name: file sha256}, in prompt order).

    Each <lora:...> tag stays where the user put it, written with the weights used (a manifest's default scale made
    explicit); LoRAs of the request's `loras` field are appended as tags, so A1111 applies them too.
    """
    listed = len(job.request.loras)  # LoraManager.prepare resolves the field's LoRAs first, then the prompt's tags
    from_field, from_tags = job.loras[:listed], job.loras[listed:]
    prompt = job.prompt or job.request.prompt
    if from_tags and len(TAG.findall(prompt)) == len(from_tags):
        tags = iter(from_tags)
        prompt = TAG.sub(lambda _match: _tag(next(tags)), prompt)
    prompt = " ".join([prompt.rstrip(), *(_tag(lora) for lora in from_field)]) if from_field else prompt
    return prompt.strip(), {lora.label: lora.sha256 for lora in (*from_tags, *from_field)}


def _tag(lora: ResolvedLora) -> str:
    return lora_tag(lora.label, lora.unet_scale, lora.text_encoder_scale)


def _steps_run(req: GenerationRequest) -> int:
    """Denoising steps actually run: img2img/inpaint skip the first (1 - strength) of the schedule."""
    if req.mode == "txt2img":
        return req.num_inference_steps
    return max(1, int(req.num_inference_steps * req.strength))
