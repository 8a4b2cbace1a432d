"""The Engine: one GenerationRequest in, one GenerationResult out, as numbered stages over cached pipelines."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from . import inpainting
from .batching import MicroBatcher
from .catalog_storage import with_local_catalog
from .component_loading import load_while_fetching
from .controlnet import ControlNets
from .controlnet_modes import first_pass, second_pass
from .denoise import Denoiser
from .device import choose_placement
from .embeddings import EmbeddingManager
from .errors import Cancelled, InvalidRequest, quote
from .families.base import PROMPT_SYNTAX, VARIATION_SEEDS
from .family_features import check_request
from .hires import HiresFix
from .hires import infotext_fields as hires_infotext
from .hires import plan as plan_hires
from .input_images import prepare_init_images
from .ip_adapter import IpAdapterManager
from .jobs import CancelCheck, Job, StepCallback
from .lora import LoraManager, ResolvedLora
from .manifests import ModelCatalog, ModelManifest
from .model_urls import ModelUrls, is_model_url
from .outputs import encode_image, infotext, lora_tag
from .pipelines import ModelLoader, PipelinePool, load_options
from .prefetch import Prefetch
from .prompt_encoding import plan_prompts
from .prompt_tags import TAG, parse_prompt_tags
from .refiner import Refiner
from .refiner import infotext_fields as refiner_infotext
from .safety import SafetyChecker
from .schedulers import check_eta
from .schema import MAX_SEED, GenerationRequest, GenerationResult, outpaint_size_problem, resolve_seed
from .settings import Settings
from .upscalers import Upscalers
from .vae import VaeManager
from .warmup import WarmUp

log = logging.getLogger("sd_core.engine")

PostPass = Callable[[Job, list], list]  # stage 6: (job, its images) -> images, run in order after denoising


class Engine:
    """Holds the model catalog and loaded pipelines of one worker; thread-safe, one denoising call at a time.

    ``generate`` runs a request as numbered stages: 1 resolve, 2 inputs, 3 conditioning, 4 adapters (``prepare``,
    no GPU), 5 denoise (``Denoiser``, micro-batched by ``MicroBatcher``), 6 post-passes, 7 encode (``finish``).
    """

    def __init__(self, settings: Settings | None = None, catalog: ModelCatalog | None = None):
        # SD_MODELS_DIR in storage (s3:// or https:// prefix): its manifests copied to a local folder, read once here
        self.settings = with_local_catalog(settings or Settings.from_env())
        self.catalog = catalog or ModelCatalog.from_settings(self.settings)
        self.placement = choose_placement(self.settings)
        self.model_urls = ModelUrls(self.catalog, self.settings)  # `model` given as a checkpoint URL
        self.loader = ModelLoader(self.catalog, self.settings, self.placement, self.model_urls)
        self.loras = LoraManager(self.settings, self.catalog)
        self.vaes = VaeManager(self.settings)
        self.embeddings = EmbeddingManager(self.settings, self.catalog)
        self.controlnets = ControlNets(self.settings, self.catalog, self.placement)
        self.ip_adapters = IpAdapterManager(self.settings, self.catalog)
        self.denoiser = Denoiser(PipelinePool(self.settings, self.placement, self.loader), self.loras, self.placement,
                                 vaes=self.vaes, embeddings=self.embeddings, controlnets=self.controlnets,
                                 ip_adapters=self.ip_adapters)
        preprocessors = self.controlnets.preprocessors  # their networks: in the same budget, run under the GPU lock
        self.denoiser.pool.extra_bytes = lambda: self.controlnets.nbytes() + preprocessors.nbytes()
        self.controlnets.make_room = self.denoiser.pool.make_room
        preprocessors.share_budget(self.denoiser.pool, self.controlnets.nbytes)
        preprocessors.gpu_lock = self.denoiser.gpu_lock
        self.upscalers = Upscalers(self.settings, self.placement, self.denoiser.gpu_lock)  # models: on first use
        self.batcher = MicroBatcher(self.denoiser, self.settings) if self.settings.max_batch_images > 1 else None
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sd-encode")
        # SD_SAFETY_CHECKER (None, when no adapter set a platform default, means off): loaded by preload or first use.
        self.safety = SafetyChecker(self.settings, self.placement) if self.settings.safety_checker else None
        self.refiner = Refiner(self.denoiser, self.loras, self.catalog, self.settings)
        # Stage 6, in order: the inpainting overlay, the hires fix's second pass, the refiner, the safety checker.
        self.hires = HiresFix(self)
        self.post_passes: list[PostPass] = [inpainting.overlay_pass, self.hires.post_pass, self.refiner.post_pass]
        if self.safety is not None:
            self.post_passes.append(self.safety.post_pass)
        self.warmup = WarmUp(self)  # SD_WARMUP: preload's last step

    @property
    def pool(self) -> PipelinePool:
        """The loaded models (memory-bounded LRU), shared with the denoiser."""
        return self.denoiser.pool

    def generate(
        self, request: GenerationRequest, *, on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Run one request end to end (micro-batched with concurrent compatible requests when enabled)."""
        with self.batcher.request() if self.batcher else contextlib.nullcontext():  # a lone request never waits
            # 1-4. resolve, inputs, conditioning, adapters: everything without the GPU (bad input fails here)
            job = self.prepare(request, on_step=on_step, should_cancel=should_cancel)
            # 5. denoise, under the GPU lock: with compatible queued jobs when batching is on
            images = self.batcher.run(job) if self.batcher else self.denoiser.run([job])[0]
            if job.should_cancel is not None and job.should_cancel():
                raise Cancelled("generation cancelled")
            # 6. post-passes on the job's images, in order
            for post_pass in self.post_passes:
                images = post_pass(job, images)
            # 7. encode, with the infotext
            return self.finish(job, images)

    def prepare(self, request: GenerationRequest, *, on_step: StepCallback | None = None,
                should_cancel: CancelCheck | None = None) -> Job:
        """Stages 1-4, everything that needs no GPU: defaults, input images, pixel budget, LoRAs, seeds."""
        started = time.perf_counter()
        # 1. resolve: the model, and the request's empty parameters from its defaults
        manifest, req = self.resolve(request)
        req = check_request(req, manifest)  # what the model's family lacks, refused; FLUX's prompt as plain text
        # 2. inputs: init image and mask decoded and sized; the pixel budget
        image = mask = None
        width, height = req.width, req.height
        plan = None
        if req.image is not None:
            image, mask, width, height = prepare_init_images(
                req.image, req.mask, width, height, self.settings.max_pixels, self.settings, req.resize_mode,
                keep_size=req.padding_mask_crop is not None and req.outpaint is None,
            )
            # mask invert/blur, only-masked crop, fills; outpainting's canvas and mask (sd_core/inpainting.py)
            image, mask, width, height, plan = inpainting.prepare(req, image, mask, width, height)
            if req.outpaint is not None and (problem := outpaint_size_problem(width, height)):
                raise InvalidRequest(problem, field="outpaint")
        self._check_pixel_budget(width, height, req.num_outputs)
        # 3. conditioning: the prompt as the pipeline gets it, A1111 <lora:...> tags split off, embedding names (whole
        # words, prompt and negative prompt) replaced with the tokens they are loaded under
        user_prompt, user_negative = req.prompt, req.negative_prompt
        prompt, tagged = parse_prompt_tags(user_prompt)
        hires = None
        if req.hires is not None:  # the hires fix, sized; the budget holds the final size too
            hires = plan_hires(req, manifest, width, height, tagged, getattr(self, "upscalers", None))
            self._check_pixel_budget(hires.width, hires.height, req.num_outputs)
        # ControlNet units: control maps at the output size (and a hires fix's final size); those of each pass
        controls = self.controlnets.resolve(req, manifest, width, height,
                                            (hires.width, hires.height) if hires is not None else None)
        if hires is not None:
            hires = dataclasses.replace(hires, controls=second_pass(controls))
        controls = first_pass(controls, hires is not None)
        if tagged:
            req = req.model_copy(update={"prompt": prompt})
        req, embeddings = self.embeddings.prepare(req, manifest)
        # 4. adapters: the LoRAs (field first, then tags) fetched here, outside the GPU lock; activated in stage 5
        loras = self.loras.resolve_all([*req.loras, *tagged], manifest)
        vae = self.vaes.resolve(req.vae, manifest)  # fetched here too; swapped in for the call in stage 5
        if self.model_urls.owns(manifest.name) and manifest.name not in self.pool:  # a model URL: fetched here too
            self.loader.prefetched[manifest.name] = self.model_urls.fetch(manifest)
        req = req.model_copy(update={"vae": vae.name if vae else None})
        ip_adapter = self.ip_adapters.prepare(req, manifest)  # image prompts: fetched and decoded here too
        first_seed = resolve_seed(req.seed)
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(req.num_outputs)]
        subseeds = None  # variation seeds: with a strength, or a subseed given (txt2img only; strength 0 = the seed's)
        if req.image is None and (req.subseed_strength > 0 or req.subseed not in (None, -1)) and (
                manifest.family.supports(VARIATION_SEEDS)):  # else strength 0 (refused above): the seed's
            first_subseed = resolve_seed(req.subseed)
            subseeds = [(first_subseed + i) % (MAX_SEED + 1) for i in range(req.num_outputs)]
            req = req.model_copy(update={"subseed": first_subseed})
        # the A1111 prompt syntax (weights, BREAK, editing) parsed here, so a malformed weight fails before the GPU
        prompts = plan_prompts(req.prompt, req.negative_prompt, req.num_inference_steps) if manifest.family.supports(
            PROMPT_SYNTAX) else None
        job = Job(request=req, manifest=manifest, width=width, height=height, seeds=seeds, image=image, mask=mask,
                  on_step=on_step, should_cancel=should_cancel, started=started, loras=loras, prompt=user_prompt,
                  negative_prompt=user_negative, embeddings=embeddings, subseeds=subseeds, vae=vae, hires=hires,
                  inpaint=plan, prompts=prompts, controls=controls, ip_adapter=ip_adapter)
        self.refiner.plan(job)  # a refined job: its refiner found and checked, latents asked of stage 5
        job.timings["prepare_s"] = time.perf_counter() - started
        return job

    def finish(self, job: Job, images: list) -> GenerationResult:
        """Stage 7: encode a job's images with their infotext and assemble its result."""
        req, t = job.request, time.perf_counter()
        strength = req.strength if req.image is not None else None
        if job.hires is not None:
            strength = job.hires.spec.denoising_strength
        hires_fields = hires_infotext(job)
        prompt, lora_hashes = _infotext_prompt(job)
        negative = req.negative_prompt if job.negative_prompt is None else job.negative_prompt
        ti_hashes = {item.name: item.sha256 for item in job.embeddings}

        varied = job.subseeds is not None and req.subseed_strength > 0
        subseeds = job.subseeds if varied else [None] * len(job.seeds)

        def parameters(seed: int, subseed: int | None) -> str:
            return infotext(
                prompt=prompt, negative_prompt=negative, steps=req.num_inference_steps,
                sampler=req.scheduler, cfg_scale=req.guidance_scale, seed=seed, width=job.width, height=job.height,
                model=req.model, model_hash=job.manifest.sha256, strength=strength, lora_hashes=lora_hashes,
                clip_skip=req.clip_skip,
                subseed=subseed, subseed_strength=req.subseed_strength if varied else None,
                eta=req.eta, tiling=req.tiling, vae=job.vae.name if job.vae else None,
                vae_hash=job.vae.sha256 if job.vae else None, hires=hires_fields, ti_hashes=ti_hashes,
                extra=refiner_infotext(job) | job.manifest.family.infotext_fields(job),
            )

        def encode(item):
            seed, subseed, pil = item
            return encode_image(pil, fmt=req.output_format, quality=req.output_quality,
                                parameters=parameters(seed, subseed), seed=seed)

        items = list(zip(job.seeds, subseeds, images, strict=True))
        # Pillow encodes without the GIL: several images of one request are encoded in parallel.
        encoded = list(self._encoders.map(encode, items)) if len(items) > 1 else [encode(i) for i in items]
        job.timings["encode_s"] = time.perf_counter() - t
        job.timings["total_s"] = time.perf_counter() - job.started
        result = GenerationResult(images=encoded, seeds=job.seeds, model=req.model,
                                  parameters=parameters(job.seeds[0], subseeds[0]), timings=job.timings,
                                  subseeds=job.subseeds if varied else None,
                                  request=req.model_copy(update={"prompt": job.prompt or req.prompt,
                                                                 "negative_prompt": negative}))
        if job.nsfw is not None:  # the safety checker ran (stage 6)
            result.safety_checked = True
            for image, flag in zip(result.images, job.nsfw, strict=True):
                image.nsfw = flag
        return result

    def resolve(self, request: GenerationRequest) -> tuple[ModelManifest, GenerationRequest]:
        """Stage 1: the request's model, and its empty parameters filled from that model's manifest defaults."""
        name = request.model or self.settings.default_model
        manifest = self.model_urls.resolve(name) if is_model_url(name) else self.catalog.get(name)
        defaults = manifest.defaults
        filled = request.model_copy(update={
            "model": manifest.name,
            "width": request.width or (None if request.image else defaults.width),
            "height": request.height or (None if request.image else defaults.height),
            "num_inference_steps": request.num_inference_steps or defaults.num_inference_steps,
            "guidance_scale": defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            # a request's own sigmas run on Euler (ModelFamily.check_sigmas), whatever the model's default sampler
            "scheduler": request.scheduler or ("Euler" if request.sigmas is not None else defaults.scheduler),
            "max_sequence_length": request.max_sequence_length or defaults.max_sequence_length,
        })
        check_eta(filled.scheduler, filled.eta)
        runs = manifest.family.schedulers()
        if filled.scheduler not in runs:
            raise InvalidRequest(f"{quote(filled.scheduler)} does not run {manifest.name}'s model family "
                                 f"({manifest.family.name}); valid: "
                                 f"{', '.join(runs)}", field="scheduler")
        steps = filled.num_inference_steps
        if filled.image is not None and int(steps * filled.strength) < 1:  # diffusers' img2img would run no step
            raise InvalidRequest(f"{filled.strength:g} x {steps} steps leaves no denoising step to run; raise "
                                 f"strength to at least {1 / steps:.3g} or the steps", field="strength")
        return manifest, filled

    def _check_pixel_budget(self, width: int, height: int, count: int) -> None:
        if width * height * count > self.settings.max_pixels:
            raise InvalidRequest(
                f"{count} x {width}x{height} = {width * height * count} pixels exceeds this worker's budget of "
                f"{self.settings.max_pixels} pixels (SD_MAX_PIXELS); ask for fewer or smaller images",
                field="num_outputs",
            )

    def preload(self, prefetch: Prefetch | None = None) -> dict[str, float]:
        """Cold start: fetch and load every model named by SD_PRELOAD_MODELS, then (SD_WARMUP) run one tiny generation
        per model (sd_core/warmup.py). Returns seconds per model, ``safety_checker`` and ``warmup`` (all models).

        The downloads run in a background thread (in order) while diffusers is imported and earlier models load,
        so a cold start pays max(fetch, import) rather than their sum; ``prefetch`` (sd_core/prefetch.py): the
        downloads the adapter started before importing this module, taken over here. A failed warm-up raises
        WarmUpFailed.
        """
        manifests = [self.catalog.get(name) for name in self.settings.models_to_preload]
        timings = {}
        if prefetch is None:  # no adapter started the downloads: start them now, the same way
            prefetch = Prefetch(self.settings, self.catalog)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-prefetch")
        try:
            taken = [None if m.name in self.pool else prefetch.take(m.name) for m in manifests]
            fetches = [s.future if s is not None else None for s in taken]
            watches = [s.watch if s is not None else None for s in taken]
            checker = self.safety if self.safety is not None and not self.safety.loaded else None
            checker_fetch = executor.submit(checker.fetch) if checker is not None else None
            started = time.perf_counter()
            for family in dict.fromkeys(m.family for m in manifests):
                family.pipeline_class("txt2img")  # seconds of imports, overlapping the downloads
            for manifest, fetching, watch in zip(manifests, fetches, watches, strict=True):
                refined = [m.name for m in manifests if m.refiner == manifest.name]  # a refiner shares with its base
                if fetching is not None:
                    if watch is not None and not refined:
                        self.loader.early[manifest.name] = load_while_fetching(
                            watch, fetching, load_options(manifest, self.settings, self.placement), manifest.variant)
                    try:
                        self.loader.prefetched[manifest.name] = fetching.result()
                    except BaseException:
                        self.loader.early.pop(manifest.name, None)
                        raise
                self.pool.get(manifest.name, expected_bytes=manifest.size or 0, share_from=next(iter(refined), None))
                self.loader.prefetched.pop(manifest.name, None)  # unused if the model was loaded already
                self.loader.early.pop(manifest.name, None)
                timings[manifest.name] = time.perf_counter() - started
                started = time.perf_counter()
                log.info("ready: %s in %.2fs", manifest.name, timings[manifest.name])
            if checker_fetch is not None:  # a checker that cannot be fetched or loaded fails the cold start
                timings["safety_checker"] = checker.load(checker_fetch.result())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            prefetch.cancel()  # downloads of models that were loaded already
        if self.settings.warmup:
            started = time.perf_counter()
            if self.warmup.run([m.name for m in manifests]):
                timings["warmup"] = time.perf_counter() - started
                log.info("warm-up done in %.2fs", timings["warmup"])
        return timings


def _infotext_prompt(job: Job) -> tuple[str, dict[str, str]]:
    """The prompt as A1111 writes it, and its `Lora hashes` ({name: file sha256}, in prompt order).

    Each <lora:...> tag stays where the user put it, written with the weights used (a manifest's default scale made
    explicit); LoRAs of the request's `loras` field are appended as tags, so A1111 applies them too.
    """
    listed = len(job.request.loras)  # stage 4 resolves the field's LoRAs first, then the prompt's tags
    from_field, from_tags = job.loras[:listed], job.loras[listed:]
    prompt = job.prompt or job.request.prompt
    if from_tags and len(TAG.findall(prompt)) == len(from_tags):
        tags = iter(from_tags)
        prompt = TAG.sub(lambda _match: _tag(next(tags)), prompt)
    prompt = " ".join([prompt.rstrip(), *(_tag(lora) for lora in from_field)]) if from_field else prompt
    return prompt.strip(), {lora.label: lora.sha256 for lora in (*from_tags, *from_field)}


def _tag(lora: ResolvedLora) -> str:
    return lora_tag(lora.label, lora.unet_scale, lora.text_encoder_scale)
