"""Stage 5, denoising: one batch of compatible jobs through its model's diffusers pipeline, under the GPU lock."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .device import Placement, free_memory, is_fatal_device_error, is_out_of_memory
from .errors import Cancelled, OutOfMemory, WorkerUnhealthy
from .jobs import Job
from .lora import LoraManager
from .pipelines import PipelinePool
from .schedulers import pipeline_kwargs


@dataclass
class Denoiser:
    """Owns the GPU: one batch at a time gets its pipeline from the pool, its scheduler, exactly its LoRA set, and
    the ``pipe(**kwargs)`` call. Used by the micro-batcher, or directly by the engine when batching is off."""

    pool: PipelinePool
    loras: LoraManager
    placement: Placement
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
            pipe = model.pipeline(first.mode)
            pipe.scheduler = model.scheduler(first.scheduler)
            t = time.perf_counter()
            # Exactly this batch's LoRA set (all jobs of a batch share it), or none: inside the lock, so no
            # request ever runs with another's adapters.
            self.loras.activate(model, jobs[0].loras, should_cancel=jobs[0].should_cancel if len(jobs) == 1 else None)
            lora_s = time.perf_counter() - t
            t = time.perf_counter()
            images = self._call_pipeline(pipe, jobs)
            inference_s = time.perf_counter() - t
        results, offset = [], 0
        for job in jobs:
            job.timings.update(load_s=load_s, lora_s=lora_s, inference_s=inference_s, batch_size=len(jobs))
            results.append(images[offset:offset + len(job.seeds)])
            offset += len(job.seeds)
        return results

    def _call_pipeline(self, pipe, jobs: list[Job]) -> list:
        import torch

        first = jobs[0]
        req = first.request
        seeds = [s for j in jobs for s in j.seeds]
        prompts = [j.request.prompt for j in jobs for _ in j.seeds]
        negative_prompts = [j.request.negative_prompt for j in jobs for _ in j.seeds]
        kwargs = first.manifest.family.prompt_kwargs(prompts, negative_prompts)
        kwargs.update(
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            # One CPU generator per image, so image i's initial (and ancestral) noise depends only on its own seed,
            # on every device. The same request alone gives the same pixels every time; in a batch (micro-batching,
            # num_outputs > 1) kernels that depend on the batch size may move a few pixels by 1-2 levels.
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pil",
        )
        # Align Your Steps' sigmas (they set the step count), DDIM's / TCD's eta
        family = first.manifest.family
        kwargs.update(pipeline_kwargs(req.scheduler, req.num_inference_steps, req.eta, family.ays_sigmas))
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
        total = first.steps_run

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
