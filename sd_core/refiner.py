"""The SDXL refiner: a second pass of a refiner model (sdxl-refiner manifest) on the base pass's latents (stage 6).

Two ways, Replicate's names (``refine``), as diffusers documents them:
- ``expert_ensemble_refiner``: the base runs the first ``high_noise_frac`` of the noise schedule
  (``denoising_end``) and hands its still-noisy latents to the refiner, which runs the rest (``denoising_start``).
  A1111's ``refiner_checkpoint`` + ``refiner_switch_at`` is this, the switch at that fraction of the steps.
- ``base_image_refiner``: the base denoises fully; the refiner runs img2img on those latents at diffusers' default
  strength (0.3), with ``refine_steps`` steps (default: the request's), as Replicate's SDXL model does.
The refiner pass runs with the request's prompts, guidance and sampler (built from the refiner's scheduler config),
under the GPU lock; its generators are new CPU generators seeded with each image's seed (as each image's first
pass). No LoRA reaches it: the refiner has no adapters, and the base's are switched off on the modules the two
share (the refiner's VAE and bigG encoder are the base's when their files are: sd_core/shared_modules.py).
"""

from __future__ import annotations

import time

from .denoise import Denoiser
from .errors import Cancelled, InvalidRequest, ModelNotFound, quote
from .jobs import Job
from .lora import LoraManager
from .manifests import ModelCatalog, ModelManifest
from .schedulers import pipeline_kwargs
from .settings import Settings

ENSEMBLE, BASE_IMAGE = "expert_ensemble_refiner", "base_image_refiner"
BASE_IMAGE_STRENGTH = 0.3  # StableDiffusionXLImg2ImgPipeline's default, which Replicate's base_image_refiner runs


def refines(request) -> bool:
    """Whether a request runs a refiner pass (an ensemble that switches at 1.0 is the base model alone)."""
    return request.refine == BASE_IMAGE or (request.refine == ENSEMBLE and request.high_noise_frac < 1)


def refiner_steps(request) -> int:
    """Steps the refiner pass runs (for progress): the rest of the schedule, or img2img's share of refine_steps."""
    if request.refine == ENSEMBLE:
        return request.num_inference_steps - base_steps(request)
    steps = request.refine_steps or request.num_inference_steps
    return min(int(steps * BASE_IMAGE_STRENGTH), steps)  # as diffusers' get_timesteps


def base_steps(request) -> int:
    """Steps the base pass runs: all of them, or (ensemble) those above the switch, counted as diffusers does."""
    if request.refine != ENSEMBLE:
        return request.num_inference_steps
    return max(0, min(request.num_inference_steps, round(request.num_inference_steps * request.high_noise_frac)))


class Refiner:
    """Plans refined jobs (stage 1, no GPU) and runs their refiner pass (stage 6, ``post_pass``)."""

    def __init__(self, denoiser: Denoiser, loras: LoraManager, catalog: ModelCatalog, settings: Settings):
        self.denoiser = denoiser
        self.loras = loras
        self.catalog = catalog
        self.settings = settings

    def plan(self, job: Job) -> None:
        """Refuse a refiner as the request's own model; for a refined request, find its refiner (the request's,
        the model manifest's `refiner`, SD_DEFAULT_REFINER), check it refines this model's family, ask the base pass
        for latents, and count both passes in the progress."""
        manifest, req = job.manifest, job.request
        if manifest.family.refines:
            raise InvalidRequest(
                f"{quote(req.model)} is a refiner: use it as `refiner` (A1111: refiner_checkpoint) with a "
                f"{' or '.join(manifest.family.refines)} model", field="model")
        if not refines(req):
            return
        if req.refine == BASE_IMAGE and refiner_steps(req) < 1:  # diffusers' img2img refuses to run no step
            raise InvalidRequest(
                f"base_image_refiner runs {BASE_IMAGE_STRENGTH:g} of its steps (img2img strength): give at least 4 "
                f"(got {req.refine_steps or req.num_inference_steps})", field="refine_steps")
        job.refiner = self._refiner(manifest, req.refiner)
        job.request = req.model_copy(update={"refiner": job.refiner.name})  # reported as used
        job.pipe_kwargs = {"output_type": "latent"}
        if req.refine == ENSEMBLE:
            job.pipe_kwargs["denoising_end"] = req.high_noise_frac
        if job.on_step is not None:
            job.on_step = _Progress(job.on_step, base_steps(req) + refiner_steps(req))

    def _refiner(self, manifest: ModelManifest, name: str | None) -> ModelManifest:
        name = name or manifest.refiner or self.settings.default_refiner
        if not name:
            raise InvalidRequest("refine needs a refiner model: name one, or give the manifest of "
                                 f"{quote(manifest.name)} a `refiner:` (or set SD_DEFAULT_REFINER)", field="refiner")
        try:
            refiner = self.catalog.get(name)
        except ModelNotFound as exc:
            raise ModelNotFound(exc.message, field="refiner") from None
        if not refiner.family.refines:
            raise InvalidRequest(f"{quote(name)} is no refiner (architecture {refiner.architecture})", field="refiner")
        if manifest.architecture not in refiner.family.refines:
            raise InvalidRequest(
                f"{quote(name)} refines {' or '.join(refiner.family.refines)} models, not {quote(manifest.name)} "
                f"({manifest.architecture})", field="refiner")
        return refiner

    def post_pass(self, job: Job, latents) -> list:
        """The refiner pass of a refined job on its base-pass latents: its images; other jobs' images unchanged."""
        if job.refiner is None:
            return latents
        import torch

        req, refiner, t = job.request, job.refiner, time.perf_counter()
        count = len(job.seeds)
        with self.denoiser.exclusive():
            pool = self.denoiser.pool
            if job.loras and req.model in pool:  # the base's adapters off: the two may share text_encoder_2
                self.loras.activate(pool.get(req.model), ())
            model = pool.get(refiner.name, expected_bytes=refiner.size or 0, share_from=req.model)
            pipe = model.pipeline("txt2img")  # a refiner's one pipeline: the img2img class (families/sdxl_refiner.py)
            steps = req.num_inference_steps if req.refine == ENSEMBLE else (req.refine_steps or req.num_inference_steps)
            pipe.scheduler = model.scheduler(req.scheduler, steps)
            kwargs = refiner.family.prompt_kwargs([req.prompt] * count, [req.negative_prompt] * count)
            kwargs.update(image=latents, num_inference_steps=steps, guidance_scale=req.guidance_scale,
                          generator=[torch.Generator("cpu").manual_seed(seed) for seed in job.seeds],
                          output_type="pil")
            kwargs.update(pipeline_kwargs(req.scheduler, steps, req.eta, refiner.family.ays_sigmas, pipe.scheduler))
            if req.refine == ENSEMBLE:
                kwargs["denoising_start"] = req.high_noise_frac
            else:
                kwargs["strength"] = BASE_IMAGE_STRENGTH
            if hasattr(pipe.scheduler, "noise_sampler_seed"):
                pipe.scheduler.noise_sampler_seed = list(job.seeds)

            def step_end(pipeline, step, timestep, callback_kwargs):
                if job.should_cancel is not None and job.should_cancel():
                    raise Cancelled("generation cancelled")
                if isinstance(job.on_step, _Progress):
                    job.on_step.refined(step + 1)
                return callback_kwargs

            kwargs["callback_on_step_end"] = step_end
            images = self.denoiser.invoke(pipe, kwargs)
        job.timings["refine_s"] = time.perf_counter() - t
        return images


def infotext_fields(job: Job) -> dict[str, object]:
    """A refined job's infotext fields, as A1111 writes its refiner: ``Refiner: name [short hash]``, ``Refiner switch
    at: 0.8`` (base_image_refiner, which A1111 has not: ``Refiner steps`` in its place); {} for other jobs."""
    refiner, req = job.refiner, job.request
    if refiner is None:
        return {}
    name = f"{refiner.name} [{refiner.sha256[:10]}]" if refiner.sha256 else refiner.name
    if req.refine == ENSEMBLE:
        return {"Refiner": name, "Refiner switch at": f"{req.high_noise_frac:g}"}
    return {"Refiner": name, "Refiner steps": req.refine_steps or req.num_inference_steps}


class _Progress:
    """A job's step callback over both passes: the base's steps, then the refiner's after them, of their sum."""

    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def __call__(self, done: int, _total: int) -> None:  # the base pass (the denoiser's callback)
        self.done = min(done, self.total)
        self.report(self.done, self.total)

    def refined(self, done: int) -> None:
        self.report(min(self.done + done, self.total), self.total)
