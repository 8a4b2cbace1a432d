"""Schedules that pass their own sigmas (Euler SGM Uniform / Align Your Steps / Normal, a request's `sigmas`) with a
ControlNet on an init image (sd_core/scheduler_sigmas.py): equal to bare diffusers' ControlNet pipelines whose Euler
scheduler is given those sigmas, and, with the unit inactive, to the plain img2img pipeline called with `sigmas=`."""

import io

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from sd_core import a1111
from sd_core.scheduler_sigmas import sigmas_on_scheduler
from sd_core.schedulers import AYS_SD15, AYS_SDXL, ays_schedule, normal_schedule, sgm_uniform_schedule
from sd_core.schema import GenerationRequest
from tests.fixtures.controlnet import BareControlNet, as_array, picture, unit
from tests.fixtures.images import png_b64 as b64

STEPS, STRENGTH = 3, 0.7  # int(3 x 0.7) = 2 steps run: the last two of the schedule
FAST = {"prompt": "a house", "seed": 5, "num_inference_steps": STEPS, "guidance_scale": 7.0, "width": 64,
        "height": 64, "model": "tiny-sd15", "image": b64(picture(7)), "strength": STRENGTH}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields) -> np.ndarray:
    return pixels(engine.generate(GenerationRequest(**{**FAST, **fields})))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    return BareControlNet(tiny_bucket)


def schedule(name: str, alphas_cumprod) -> list[float]:
    if name == "Euler SGM Uniform":
        return sgm_uniform_schedule(alphas_cumprod, STEPS)
    if name == "Euler Normal":
        return normal_schedule(alphas_cumprod, STEPS)
    return ays_schedule(AYS_SD15, STEPS)


def fixed_sigmas(pipe, sigmas: list[float]) -> None:
    """Bare diffusers' own route: an Euler scheduler whose set_timesteps(steps) runs set_timesteps(sigmas=...)."""

    class Fixed(EulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            assert num_inference_steps == len(sigmas) - 1
            super().set_timesteps(device=device, sigmas=sigmas)

    pipe.scheduler = Fixed.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("scheduler", ["Euler SGM Uniform", "Euler Align Your Steps"])
def test_controlnet_img2img_runs_the_schedule_as_bare_diffusers(engine, bare, scheduler):
    pipe = bare.make("Img2Img", controlnet=bare.net("tiny-sd15-control-a"))
    sigmas = schedule(scheduler, pipe.scheduler.alphas_cumprod)
    fixed_sigmas(pipe, sigmas)
    expected = as_array(BareControlNet.run(pipe, image=picture(7), control_image=picture(1), strength=STRENGTH,
                                           num_inference_steps=STEPS, controlnet_conditioning_scale=1.0))
    result = generate(engine, scheduler=scheduler, controlnets=[unit()])
    assert np.array_equal(result, expected)
    uniform = generate(engine, scheduler="Euler", controlnets=[unit()])
    assert np.abs(result - uniform).mean() > 0.5  # the sigmas were not dropped


def test_sdxl_controlnet_img2img_runs_align_your_steps_as_bare_diffusers(engine, tiny_bucket):
    xl = BareControlNet(tiny_bucket, "sdxl")
    pipe = xl.make("Img2Img", controlnet=xl.net("tiny-sdxl-control-a"))
    fixed_sigmas(pipe, ays_schedule(AYS_SDXL, STEPS))  # SDXL's own table
    expected = as_array(BareControlNet.run(pipe, image=picture(7), control_image=picture(1), strength=STRENGTH,
                                           num_inference_steps=STEPS, controlnet_conditioning_scale=1.0))
    result = generate(engine, model="tiny-sdxl", scheduler="Euler Align Your Steps",
                      controlnets=[unit("tiny-xl-control")])
    assert np.array_equal(result, expected)


def test_controlnet_inpaint_runs_the_schedule_as_bare_diffusers(engine, bare):
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    pipe = bare.make("Inpaint", controlnet=bare.net("tiny-sd15-control-a"))
    fixed_sigmas(pipe, schedule("Euler Normal", pipe.scheduler.alphas_cumprod))
    expected = as_array(BareControlNet.run(pipe, image=picture(7), mask_image=mask, control_image=picture(1),
                                           strength=STRENGTH, num_inference_steps=STEPS, width=64, height=64,
                                           controlnet_conditioning_scale=1.0))
    result = generate(engine, scheduler="Euler Normal", mask=b64(mask.convert("RGB")), controlnets=[unit()])
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("scheduler", ["Euler SGM Uniform", "Euler Align Your Steps", None])
def test_inactive_unit_gives_plain_img2img_with_sigmas(engine, bare, scheduler):
    """The stronger check: a unit active at no step (window 0.99-1 of 2 steps: conditioning scale 0 at each) through
    the ControlNet pipeline equals diffusers' plain StableDiffusionImg2ImgPipeline(..., sigmas=...) at the same
    strength and seed. None: a request's own ``sigmas``."""
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(bare.pipe)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = EulerDiscreteScheduler.from_config(bare.pipe.scheduler.config, timestep_spacing="linspace")
    own = [12.0, 3.5, 0.4]
    sigmas = [*own, 0.0] if scheduler is None else schedule(scheduler, img2img.scheduler.alphas_cumprod)
    with torch.inference_mode():
        want = img2img(prompt="a house", image=picture(7), strength=STRENGTH, sigmas=sigmas, guidance_scale=7.0,
                       generator=torch.Generator("cpu").manual_seed(5)).images[0]
    fields = {"scheduler": scheduler} if scheduler else {"sigmas": own}
    result = generate(engine, **fields, controlnets=[unit(start=0.99, end=1.0)])
    assert np.array_equal(result, as_array(want))


def test_hires_second_pass_with_a_unit_runs_the_schedule_as_bare_diffusers(engine, bare):
    """The hires fix's second pass (ControlNet img2img, 2 of a 3-step schedule) gets its sigmas too; the first
    (ControlNet txt2img) takes them as an argument."""
    net = bare.net("tiny-sd15-control-a")
    first_pipe = bare.make(controlnet=net)
    sigmas = sgm_uniform_schedule(first_pipe.scheduler.alphas_cumprod, 2)
    first = BareControlNet.run(first_pipe, image=picture(1), num_inference_steps=2, sigmas=sigmas, width=64, height=64)
    second = bare.make("Img2Img", controlnet=net)
    fixed_sigmas(second, sgm_uniform_schedule(second.scheduler.alphas_cumprod, 3))
    lanczos = Image.Resampling.LANCZOS
    expected = BareControlNet.run(second, image=first.resize((128, 128), lanczos), strength=0.75,
                                  num_inference_steps=3, control_image=picture(1).resize((128, 128), lanczos),
                                  controlnet_conditioning_scale=1.0)
    result = engine.generate(GenerationRequest(
        prompt="a house", seed=5, num_inference_steps=2, guidance_scale=7.0, width=64, height=64, model="tiny-sd15",
        scheduler="Euler SGM Uniform", controlnets=[unit()],
        hires={"scale": 2, "upscaler": "Lanczos", "denoising_strength": 0.75}))
    assert np.array_equal(pixels(result), as_array(expected))


def test_a1111_img2img_with_a_controlnet_unit_and_sgm_uniform_runs(engine):
    payload = {"prompt": "a house", "seed": 5, "steps": STEPS, "cfg_scale": 7, "width": 64, "height": 64,
               "init_images": [FAST["image"]], "denoising_strength": STRENGTH, "sampler_name": "Euler",
               "scheduler": "SGM Uniform", "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
               "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-control-a", "image": b64(picture(1)),
                                                             "weight": 1.0}]}}}
    result = engine.generate(a1111.to_request(a1111.parse_call(payload)))
    assert np.array_equal(pixels(result), generate(engine, scheduler="Euler SGM Uniform", controlnets=[unit()]))
    assert "Schedule type: SGM Uniform" in result.parameters


def test_the_scheduler_is_unchanged_after_the_call(engine):
    """The sigmas live on the shared scheduler object for one call only: the plain img2img on the same schedule (whose
    pipeline calls set_timesteps(sigmas=...) itself) gives the same image before and after."""
    before = generate(engine, scheduler="Euler SGM Uniform")
    generate(engine, scheduler="Euler SGM Uniform", controlnets=[unit()])
    assert np.array_equal(generate(engine, scheduler="Euler SGM Uniform"), before)


class _Pipe:
    """A pipeline that takes no ``sigmas`` and fails inside its call."""

    def __init__(self):
        self.scheduler = EulerDiscreteScheduler()

    def __call__(self, num_inference_steps, **_):
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        raise ValueError("failed mid-call")


def test_the_scheduler_is_restored_when_the_call_fails():
    pipe = _Pipe()
    with pytest.raises(ValueError, match="failed mid-call"):
        with sigmas_on_scheduler(pipe, {"num_inference_steps": 2, "sigmas": [5.0, 1.0, 0.0]},
                                 frozenset({"num_inference_steps"})) as kwargs:
            assert "sigmas" not in kwargs
            pipe(**kwargs)
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert pipe.scheduler.sigmas[:2].tolist() == pytest.approx([5.0, 1.0])  # the sigmas it was given
    pipe.scheduler.set_timesteps(4)  # the class's own method again
    assert len(pipe.scheduler.timesteps) == 4
