"""Stage 5, denoising: one batch of compatible jobs through its model's diffusers pipeline, under the GPU lock."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .controlnet import ControlNets, pipe_kwargs, seeded_global_rng
from .controlnet_modes import soft_injection
from .device import Placement, raise_device_failure
from .embeddings import EmbeddingManager
from .errors import Cancelled, InvalidRequest, quote
from .inpainting import latent_fill_kwargs
from .ip_adapter import IpAdapterManager
from .jobs import Job
from .latent_resize import init_latents
from .lora import LoraManager
from .pipelines import PipelinePool
from .prompt_conditioning import BatchConditioning, plan_groups
from .scheduler_sigmas import sigmas_on_scheduler
from .schedulers import pipeline_kwargs
from .tiling import seamless
from .vae import VaeManager, swapped


@dataclass
class Denoiser:
    """Owns the GPU: one batch at a time gets its pipeline from the pool, its scheduler, exactly its LoRA set, its
    VAE (swapped in for the call only), and the ``pipe(**kwargs)`` call. Used by the micro-batcher, or directly by
    the engine when batching is off."""

    pool: PipelinePool
    loras: LoraManager
    placement: Placement
    vaes: VaeManager | None = None
    embeddings: EmbeddingManager | None = None
    controlnets: ControlNets | None = None
    ip_adapters: IpAdapterManager | None = None
    # Reentrant: a post-pass that holds it (hires fix) may call the upscalers, which take it too.
    _gpu_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def gpu_lock(self):
        """The lock every use of the GPU holds (a context manager): denoising batches, model upscalers."""
        return self._gpu_lock

    def run(self, jobs: list[Job]) -> list[list]:
        """Denoise one batch of compatible jobs (same model, mode, size, steps, scheduler, guidance) in one call;
        the images of each job, in order."""
        first = jobs[0].request
        with self._gpu_lock:
            t = time.perf_counter()
            for job in jobs:  # waiting for the GPU: behind other requests, or for batch-mates
                job.timings["queue_s"] = t - job.started - job.timings.get("prepare_s", 0.0)
            model = self.pool.get(first.model, expected_bytes=jobs[0].manifest.size or 0)
            load_s = time.perf_counter() - t
            if jobs[0].controls:  # a job with ControlNet units runs alone (Job.batch_key)
                pipe = self.controlnets.pipeline(model, jobs[0].mode, jobs[0].controls)
            else:
                pipe = model.pipeline(jobs[0].mode)
            pipe.scheduler = model.scheduler(first.scheduler, first.num_inference_steps, first.sigmas is not None)
            clip_skip = _clip_skip(jobs[0], pipe)  # all jobs of a batch share it (Job.batch_key)
            t = time.perf_counter()
            # Exactly this batch's LoRA set (all jobs of a batch share it), or none: inside the lock, so no
            # request ever runs with another's adapters.
            self.loras.activate(model, jobs[0].loras, should_cancel=jobs[0].should_cancel if len(jobs) == 1 else None)
            if self.embeddings is not None:  # every embedding of the batch's prompts (jobs may use different ones)
                self.embeddings.activate(model, tuple({e.sha256: e for j in jobs for e in j.embeddings}.values()))
            lora_s = time.perf_counter() - t
            vae, loaded = self.vaes.module(model, jobs[0].vae) if self.vaes else (None, False)  # shared (batch_key)
            if loaded:
                self.pool.fit(model.name)  # the model grew by a VAE: stay within the memory budget
            t = time.perf_counter()
            if self.ip_adapters is not None:  # exactly this job's IP-Adapter, or none (such jobs never batch)
                self.ip_adapters.activate(model, pipe, jobs[0].ip_adapter)
            ip_adapter_s = time.perf_counter() - t
            t = time.perf_counter()
            results: list = [None] * len(jobs)
            # the model's own VAE and padding are back afterwards, whatever happens; a batch shares both (batch_key)
            # soft injection (My prompt is more important) on this call's ControlNets only
            with swapped(pipe, model, vae), seamless(pipe, first.tiling), soft_injection(pipe, jobs[0].controls):
                # One pipeline call per conditioning layout: the text as is (plain prompts), or embeddings of one length
                for members, conditioning in plan_groups(pipe, jobs, clip_skip):
                    group = [jobs[i] for i in members]
                    images = self._call_pipeline(pipe, group, clip_skip, conditioning)
                    offset = 0
                    for i, job in zip(members, group, strict=True):
                        results[i] = images[offset:offset + len(job.seeds)]
                        job.timings["batch_size"] = len(group)
                        offset += len(job.seeds)
            inference_s = time.perf_counter() - t
        for job in jobs:
            job.timings.update(load_s=load_s, lora_s=lora_s, inference_s=inference_s)
            if job.ip_adapter is not None:
                job.timings["ip_adapter_s"] = ip_adapter_s
        return results

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the GPU lock, for a post-pass's own pipeline calls (the refiner's second pass): no batch runs
        meanwhile."""
        with self._gpu_lock:
            yield

    def invoke(self, pipe, kwargs: dict) -> list:
        """``pipe(**kwargs).images`` without autograd (hold ``exclusive``); an out-of-memory or device error
        becomes OutOfMemory (caches released) or WorkerUnhealthy."""
        import torch

        # a schedule's sigmas a ControlNet img2img / inpaint pipeline would swallow: set on its scheduler instead
        with sigmas_on_scheduler(pipe, kwargs, _named_parameters(type(pipe))) as kwargs:
            check_taken(pipe, kwargs)
            try:
                with torch.inference_mode():
                    return pipe(**kwargs).images
            except Exception as exc:
                raise_device_failure(exc, self.placement, "ran out of memory during generation; try fewer or "
                                     "smaller images", field="num_outputs")
                raise

    def _call_pipeline(self, pipe, jobs: list[Job], clip_skip: int | None = None,
                       conditioning: BatchConditioning | None = None) -> list:
        import torch

        first = jobs[0]
        req = first.request
        seeds = [s for j in jobs for s in j.seeds]
        if conditioning is None:  # the hot path: plain prompts, the pipeline encodes them itself
            prompts = [j.request.prompt for j in jobs for _ in j.seeds]
            negative_prompts = [j.request.negative_prompt for j in jobs for _ in j.seeds]
            kwargs = first.manifest.family.prompt_kwargs(prompts, negative_prompts)
        else:  # A1111 syntax, long prompts, clip skip: embeddings (prompt_encoding)
            kwargs = conditioning.kwargs()
        # One CPU generator per image, so image i's initial (and ancestral) noise depends only on its own seed,
        # on every device. The same request alone gives the same pixels every time; in a batch (micro-batching,
        # num_outputs > 1) kernels that depend on the batch size may move a few pixels by 1-2 levels.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs.update(
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            generator=generators,
            output_type=first.output_type,  # latents for a hires fix upscaled in latent space (Job.batch_key)
        )
        family = first.manifest.family
        kwargs.update(family.call_kwargs(first))  # T5 families: max_sequence_length; FLUX: img2img size
        if first.mode == "txt2img" and any(j.subseeds is not None for j in jobs):
            kwargs["latents"] = variation_latents(pipe, jobs, generators)
        # Align Your Steps' / Normal's sigmas (they set the step count), DDIM's / TCD's eta
        kwargs.update(pipeline_kwargs(req.scheduler, req.num_inference_steps, req.eta, family.ays_sigmas,
                                      pipe.scheduler))
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            # DPM++ SDE's Brownian noise: one tree per image seeded with its own seed (as A1111 does), instead of
            # torch's global RNG. set_timesteps() drops the previous run's trees.
            pipe.scheduler.noise_sampler_seed = seeds
        if first.ip_adapter is not None:  # one adapter: its reference images, as diffusers takes them
            kwargs["ip_adapter_image"] = [list(first.ip_adapter.images)]
        if first.mode == "txt2img":
            kwargs.update(width=first.width, height=first.height)
        else:
            image = first.image
            if req.resize_mode == "latent" and first.mode == "img2img":  # A1111's latent upscale: own-size image
                image = init_latents(pipe, image, first.width, first.height, generators)
            kwargs.update(image=image, strength=req.strength)
        if first.mode == "inpaint":
            kwargs.update(mask_image=first.mask, width=first.width, height=first.height)
            kwargs.update(latent_fill_kwargs(pipe, first))  # A1111's latent noise / latent nothing fills
        if first.controls:
            kwargs.update(pipe_kwargs(first.controls, first.mode, family))

        def step_end(pipeline, step, timestep, callback_kwargs):
            cancels = [j.should_cancel() if j.should_cancel else False for j in jobs]
            if all(cancels):
                raise Cancelled("generation cancelled")
            for job in jobs:
                if job.on_step is not None:
                    job.on_step(step + 1, job.steps_run)  # a hires job's total counts both passes
            if conditioning is not None:  # prompt editing / alternation: the next step's conditioning
                return conditioning.on_step_end(pipeline, step, callback_kwargs)
            return callback_kwargs

        kwargs["callback_on_step_end"] = step_end
        kwargs.update(first.pipe_kwargs)  # what a post-pass needs of this call (same for the batch: Job.batch_key)
        if first.controls:  # ControlNet jobs run alone: the global RNG (SD3's control latents) from the job's seed
            with seeded_global_rng(seeds[0]):
                return self.invoke(pipe, kwargs)
        return self.invoke(pipe, kwargs)


def check_taken(pipe, kwargs: dict) -> None:
    """Refuse a call whose arguments the pipeline would swallow unread (diffusers' ControlNet img2img / inpaint
    pipelines take ``**kwargs`` and ignore them): nothing that changes the image may be dropped silently (their
    sigmas go to an Euler scheduler: sigmas_on_scheduler)."""
    ignored = sorted(set(kwargs) - _named_parameters(type(pipe)))
    if "sigmas" in ignored:
        raise InvalidRequest(f"this schedule passes its own sigmas, which diffusers' {type(pipe).__name__} does not "
                             f"take and its {type(pipe.scheduler).__name__} cannot be given; pick another schedule "
                             "(Karras, Exponential, Automatic...) or sampler", field="scheduler")
    if ignored:
        raise RuntimeError(f"{type(pipe).__name__} would ignore {ignored}")  # a bug here, not a request to refuse


@functools.cache
def _named_parameters(cls) -> frozenset[str]:
    return frozenset(name for name, param in inspect.signature(cls.__call__).parameters.items()
                     if param.kind is not inspect.Parameter.VAR_KEYWORD)


def _clip_skip(job: Job, pipe) -> int | None:
    """The job's clip skip for the pipeline call (None: no skip); refused when the model's text encoder is too shallow
    for it (the depth is known once the model is loaded)."""
    skip = job.request.clip_skip
    if not skip:
        return None
    model = quote(job.request.model)
    family = job.manifest.family.name
    limit = job.manifest.family.clip_skip_limit(pipe)
    if limit is None:
        raise InvalidRequest(f"{model} is a {family} model, which takes no clip skip (A1111 applies it to SD1.x only); "
                             "use 0 (CLIP_stop_at_last_layers 1)", field="clip_skip")
    depth, most = limit
    if skip > most:
        raise InvalidRequest(
            f"{model}'s text encoder has {depth} layers, of which at most {most} can be skipped: clip_skip 0-{most} "
            f"(A1111's CLIP_stop_at_last_layers 1-{most + 1}); got clip_skip {skip} (CLIP_stop_at_last_layers "
            f"{skip + 1})", field="clip_skip",
        )
    return skip
def variation_latents(pipe, jobs: list[Job], generators: list) -> object:
    """The initial noise of a txt2img batch with variation seeds, drawn as diffusers' prepare_latents would draw it.

    Per image: its seed's noise from its own generator (same shape, dtype and draw as ``randn_tensor``, so the
    generator is left where the pipeline would leave it for the ancestral noise), then, for jobs with
    ``subseed_strength`` > 0, A1111's variation: slerp toward the noise of subseed + i (its own fresh CPU generator).
    Unscaled: the pipeline multiplies ``latents`` by the scheduler's ``init_noise_sigma`` itself.
    """
    import torch

    first = jobs[0]
    encoder = getattr(pipe, "text_encoder_2", None) or pipe.text_encoder
    denoiser = getattr(pipe, first.manifest.family.denoiser)  # the UNet, or SD3's MMDiT transformer
    dtype = encoder.dtype if encoder is not None else denoiser.dtype  # the prompt embeddings' dtype, as diffusers
    factor = pipe.vae_scale_factor
    shape = (1, denoiser.config.in_channels, first.height // factor, first.width // factor)
    noises, index = [], 0
    for job in jobs:
        for i in range(len(job.seeds)):
            noise = torch.randn(shape, generator=generators[index], dtype=dtype)
            index += 1
            if job.subseeds is not None and job.request.subseed_strength > 0:
                sub = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(job.subseeds[i]), dtype=dtype)
                noise = slerp(job.request.subseed_strength, noise.float(), sub.float()).to(dtype)
            noises.append(noise)
    return torch.cat(noises)


def slerp(t: float, low, high):
    """Spherical interpolation from `low` (t = 0) to `high` (t = 1) of (1, C, H, W) noise, as A1111 does it: one
    great-circle arc per channel and latent column (vectors along the height axis); nearly parallel (or opposite)
    vectors, where the arc is ill-defined, are interpolated linearly, each on its own."""
    import torch

    dot = ((low / low.norm(dim=2, keepdim=True)) * (high / high.norm(dim=2, keepdim=True))).sum(dim=2, keepdim=True)
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    arc = torch.sin((1.0 - t) * omega) / sin * low + torch.sin(t * omega) / sin * high
    return torch.where(dot.abs() < 0.9995, arc, (1.0 - t) * low + t * high)
