"""Hires fix (A1111's enable_hr), stage 6's first post-pass: the first pass upscaled, then an img2img second pass."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from PIL import Image

from .errors import Cancelled, InvalidRequest, quote
from .jobs import Job
from .manifests import ModelManifest
from .outputs import split_sampler
from .prompt_encoding import plan_prompts
from .prompt_tags import parse_prompt_tags
from .schedulers import check_eta
from .schema import MAX_SIZE, MIN_SIZE, GenerationRequest, HiresSpec

LATENT_FACTOR = 8  # pixels per latent cell (every model family here; A1111's opt_f)
# A1111's latent upscalers: torch.nn.functional.interpolate's (mode, antialias) in latent space.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True), "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True), "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers without a model: A1111's `None` is a plain Lanczos resize, as is its `Lanczos` to the same size.
PIXEL_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                   "Nearest": Image.Resampling.NEAREST}
MAX_SCHEDULE_STEPS = 1000  # the second pass's whole schedule (steps / strength): the models' training timesteps


@dataclass(frozen=True)
class HiresPlan:
    """A request's hires fix, sized: the upscale target, the centre crop to the final size, the second pass's steps."""

    spec: HiresSpec
    upscale_width: int  # the upscaled first pass, before the crop (multiples of LATENT_FACTOR)
    upscale_height: int
    width: int  # the final size
    height: int
    steps: int  # denoising steps the second pass runs (A1111's hires steps)
    schedule_steps: int  # num_inference_steps of the img2img call: `steps` of them run at this strength
    controls: tuple = ()  # the second pass's ControlNet units, maps at the final size (sd_core/controlnet_modes.py)

    @property
    def latent(self) -> bool:
        return self.spec.upscaler in LATENT_UPSCALERS

    @property
    def crop(self) -> tuple[int, int]:
        """(left, top) of the final size inside the upscaled one, in latent cells (A1111's truncate // 2)."""
        return ((self.upscale_width - self.width) // LATENT_FACTOR // 2,
                (self.upscale_height - self.height) // LATENT_FACTOR // 2)


def plan(req: GenerationRequest, manifest: ModelManifest, width: int, height: int, tags: list,
         upscalers=None) -> HiresPlan:
    """Size and check a txt2img request's hires fix (first pass at ``width`` x ``height``, ``tags`` the LoRA tags of
    its prompt) as A1111 sizes it; sizes are floored to whole latent cells (8 pixels), as A1111's are."""
    spec = req.hires
    check_upscaler(spec.upscaler, upscalers)
    if spec.scheduler is not None:
        check_eta(spec.scheduler, req.eta)
        runs = manifest.family.schedulers()
        if spec.scheduler not in runs:
            raise InvalidRequest(f"{quote(spec.scheduler)} does not run {manifest.name}'s model family; valid: "
                                 f"{', '.join(runs)}", field="hires.scheduler")
    if spec.prompt:  # the first pass's LoRAs apply to both passes: a second-pass prompt may only repeat its tags
        if parse_prompt_tags(spec.prompt)[1] != tags:
            raise InvalidRequest("its <lora:...> tags must be the prompt's (the LoRAs apply to both passes here)",
                                 field="hires.prompt")
    target_w, target_h = spec.width, spec.height
    if not target_w and not target_h:
        up_w, up_h = int(width * spec.scale), int(height * spec.scale)
        target_w, target_h = up_w, up_h
    elif not target_h:
        up_w, up_h = target_w, target_w * height // width
        target_h = up_h
    elif not target_w:
        up_w, up_h = target_h * width // height, target_h
        target_w = up_w
    elif width / height < target_w / target_h:  # both: cover the target keeping the aspect, then crop the centre
        up_w, up_h = target_w, target_w * height // width
    else:
        up_w, up_h = target_h * width // height, target_h
    cells_w, cells_h = up_w // LATENT_FACTOR, up_h // LATENT_FACTOR
    final_w = (cells_w - (up_w - target_w) // LATENT_FACTOR) * LATENT_FACTOR
    final_h = (cells_h - (up_h - target_h) // LATENT_FACTOR) * LATENT_FACTOR
    if not (MIN_SIZE <= final_w <= MAX_SIZE and MIN_SIZE <= final_h <= MAX_SIZE):
        raise InvalidRequest(f"the final size {final_w}x{final_h} is outside {MIN_SIZE}-{MAX_SIZE} pixels a side",
                             field="hires")
    steps = spec.steps or req.num_inference_steps
    return HiresPlan(spec, cells_w * LATENT_FACTOR, cells_h * LATENT_FACTOR, final_w, final_h, steps,
                     schedule_steps(steps, spec.denoising_strength))


def schedule_steps(steps: int, strength: float) -> int:
    """The img2img call's num_inference_steps so that it runs exactly ``steps`` steps at ``strength``, as A1111's
    second pass does (diffusers runs int(n * strength) of n): the shortest such schedule."""
    n = steps
    while int(n * strength) < steps:  # the expression diffusers' get_timesteps uses
        n += 1
        if n > MAX_SCHEDULE_STEPS:
            raise InvalidRequest(f"{steps} second-pass steps at strength {strength:g} need a schedule of over "
                                 f"{MAX_SCHEDULE_STEPS} steps; use fewer steps or a higher strength",
                                 field="hires.denoising_strength")
    return n


def check_upscaler(name: str, upscalers=None) -> None:
    """InvalidRequest listing the valid names unless ``name`` is a latent or pixel upscaler, or one of this worker's
    upscaler models (``upscalers``: sd_core/upscalers.py), checked before any GPU work."""
    if name in LATENT_UPSCALERS or name in PIXEL_UPSCALERS:
        return
    valid = [*LATENT_UPSCALERS, *PIXEL_UPSCALERS]
    if upscalers is not None:
        if name in upscalers.names():
            return
        valid += [n for n in upscalers.names() if n not in valid]
    raise InvalidRequest(f"unknown upscaler {quote(name)}; valid: {', '.join(valid)}", field="hires.upscaler")


def infotext_fields(job: Job) -> dict[str, object]:
    """A1111's `Hires ...` infotext fields of a hires job, in A1111's order (none without a hires fix)."""
    plan, req = job.hires, job.request
    if plan is None:
        return {}
    spec = req.hires
    fields: dict[str, object] = {}
    if spec.scheduler is not None and spec.scheduler != req.scheduler:
        sampler, schedule = split_sampler(spec.scheduler)
        fields["Hires sampler"] = sampler
        fields["Hires schedule type"] = schedule if schedule != "Automatic" else None
    if spec.prompt and spec.prompt != job.prompt:
        fields["Hires prompt"] = spec.prompt
    if spec.negative_prompt and spec.negative_prompt != req.negative_prompt:
        fields["Hires negative prompt"] = spec.negative_prompt
    if spec.guidance_scale is not None and spec.guidance_scale != req.guidance_scale:
        fields["Hires CFG Scale"] = f"{spec.guidance_scale:g}"
    if spec.width or spec.height:
        fields["Hires resize"] = f"{spec.width}x{spec.height}"
    else:
        fields["Hires upscale"] = f"{spec.scale:g}"
    if spec.steps:
        fields["Hires steps"] = spec.steps
    fields["Hires upscaler"] = spec.upscaler
    return fields


class HiresFix:
    """Stage 6's hires pass: upscales a hires job's first-pass output and runs the second pass under the GPU lock."""

    def __init__(self, engine):
        self.engine = engine  # its denoiser runs the second pass; its `upscalers` (when it has them) upscale

    def post_pass(self, job: Job, images) -> list:
        plan = job.hires
        if plan is None:
            return images
        if job.should_cancel is not None and job.should_cancel():
            raise Cancelled("generation cancelled")
        started = time.perf_counter()
        if plan.latent:
            init = upscale_latents(images, plan)
        else:
            init = self.upscale_pixels(job, images)
        job.timings["hires_upscale_s"] = time.perf_counter() - started
        spec, req = plan.spec, job.request
        first_steps = req.num_inference_steps
        second_request = req.model_copy(update={
            "prompt": parse_prompt_tags(spec.prompt)[0] if spec.prompt else req.prompt,
            "negative_prompt": spec.negative_prompt or req.negative_prompt,
            "scheduler": spec.scheduler or req.scheduler,
            "guidance_scale": req.guidance_scale if spec.guidance_scale is None else spec.guidance_scale,
            "num_inference_steps": plan.schedule_steps, "strength": spec.denoising_strength,
        })
        on_step = None
        if job.on_step is not None:
            def on_step(done: int, _total: int) -> None:
                job.on_step(first_steps + done, job.steps_run)  # progress over both passes
        second = dataclasses.replace(
            job, request=second_request, image=init, width=plan.width, height=plan.height, hires=None,
            pass_mode="img2img", on_step=on_step, subseeds=None, timings={}, controls=plan.controls,
            # the second pass's own prompts (hr_prompt), their editing counted over the steps it runs
            prompts=plan_prompts(second_request.prompt, second_request.negative_prompt,
                                 max(1, int(plan.schedule_steps * spec.denoising_strength))),
            started=time.perf_counter(),
        )
        if job.should_cancel is not None and job.should_cancel():  # an upscaler model may take a while
            raise Cancelled("generation cancelled")
        result = self.engine.denoiser.run([second])[0]
        job.timings["hires_s"] = second.timings.get("inference_s", 0.0)
        return result

    def upscale_pixels(self, job: Job, images: list) -> list:
        """The first pass's images at the upscale size (Lanczos/Nearest, or an upscaler model), centre-cropped."""
        plan = job.hires
        size = (plan.upscale_width, plan.upscale_height)
        name = plan.spec.upscaler
        if name in PIXEL_UPSCALERS:
            upscaled = [image.resize(size, resample=PIXEL_UPSCALERS[name]) for image in images]
        else:
            upscalers = getattr(self.engine, "upscalers", None)
            check_upscaler(name, upscalers)
            upscaled = upscalers.upscale(name, images, *size, job.should_cancel)
        left, top = (cells * LATENT_FACTOR for cells in plan.crop)
        if (plan.width, plan.height) == size:
            return upscaled
        return [image.crop((left, top, left + plan.width, top + plan.height)) for image in upscaled]


def upscale_latents(latents, plan: HiresPlan):
    """First-pass latents (N, C, h, w) interpolated to the upscale size as A1111 does, then centre-cropped."""
    import torch

    mode, antialias = LATENT_UPSCALERS[plan.spec.upscaler]
    size = (plan.upscale_height // LATENT_FACTOR, plan.upscale_width // LATENT_FACTOR)
    with torch.inference_mode():
        upscaled = torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)
    left, top = plan.crop
    return upscaled[:, :, top:top + plan.height // LATENT_FACTOR, left:left + plan.width // LATENT_FACTOR]
