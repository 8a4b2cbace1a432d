"""Samplers, schedules and seeds on the tiny models: same settings, same image as bare diffusers, every time."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core.schema import GenerationRequest

PROMPT = "a red fox in the snow"


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    values = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 3, "guidance_scale": 7.0, "width": 64,
              "height": 64, **fields}
    return engine.generate(GenerationRequest(**values))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Bare diffusers pipelines loaded from the tiny models' diffusers folders (no sd_core involved)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipes = {}

    def get(arch: str):
        if arch not in pipes:
            cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
            pipes[arch] = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
            pipes[arch].set_progress_bar_config(disable=True)
            pipes[arch].base_config = dict(pipes[arch].scheduler.config)  # tests swap schedulers in
        return pipes[arch]

    return get


def bare_image(pipe, scheduler, seed: int, **kwargs) -> np.ndarray:
    import torch

    pipe.scheduler = scheduler
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras"])
def test_sde_sampler_same_seed_same_image(engine, name):
    import torch

    torch.manual_seed(0)  # the Brownian noise must not come from torch's global RNG
    first = generate(engine, scheduler=name, seed=7, num_outputs=2)
    torch.manual_seed(1)
    again = generate(engine, scheduler=name, seed=7, num_outputs=2)
    for index in range(2):
        assert np.array_equal(pixels(first, index), pixels(again, index)), index
    assert np.abs(pixels(first, 0) - pixels(first, 1)).mean() > 0.5


def test_sde_image_i_is_defined_by_its_own_seed(engine):
    batch = generate(engine, scheduler="DPM++ SDE Karras", seed=20, num_outputs=2)
    alone = generate(engine, scheduler="DPM++ SDE Karras", seed=21)
    assert np.abs(pixels(batch, 1) - pixels(alone)).max() <= 2  # batch-size dependent kernels only


@pytest.mark.parametrize(("arch", "name", "flags"), [("sd15", "DPM++ SDE Karras", {"use_karras_sigmas": True}),
                                                      ("sdxl", "DPM++ SDE", {})])
def test_sde_sampler_equals_bare_diffusers_seeded_noise_sampler(engine, bare, arch, name, flags):
    from diffusers import DPMSolverSDEScheduler

    pipe = bare(arch)
    scheduler = DPMSolverSDEScheduler.from_config(pipe.base_config, noise_sampler_seed=42, **flags)
    expected = bare_image(pipe, scheduler, 42, negative_prompt="blurry")
    result = generate(engine, model=f"tiny-{arch}", scheduler=name, seed=42, negative_prompt="blurry")
    assert np.array_equal(pixels(result), expected)


def test_sdxl_empty_negative_prompt_equals_bare_diffusers_without_one(engine, bare):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = bare("sdxl")
    assert pipe.config.force_zeros_for_empty_prompt
    expected = bare_image(pipe, EulerAncestralDiscreteScheduler.from_config(pipe.base_config), 3)
    result = generate(engine, model="tiny-sdxl", scheduler="Euler a", seed=3, negative_prompt="")
    assert np.array_equal(pixels(result), expected)
    encoded_empty = generate(engine, model="tiny-sdxl", scheduler="Euler a", seed=3, negative_prompt=" ")
    assert not np.array_equal(pixels(encoded_empty), expected)  # a non-empty negative prompt is encoded


def test_sd15_empty_negative_prompt_equals_bare_diffusers(engine, bare):
    from diffusers import DPMSolverMultistepScheduler

    pipe = bare("sd15")
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.base_config, use_karras_sigmas=True)
    expected = bare_image(pipe, scheduler, 4)
    assert np.array_equal(pixels(generate(engine, scheduler="DPM++ 2M Karras", seed=4)), expected)


@pytest.mark.parametrize(("name", "cls", "flags"), [
    ("DPM++ 2M Exponential", "DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("Euler", "EulerDiscreteScheduler", {}),
])
def test_sampler_and_schedule_equal_bare_diffusers(engine, bare, name, cls, flags):
    import diffusers

    pipe = bare("sd15")
    expected = bare_image(pipe, getattr(diffusers, cls).from_config(pipe.base_config, **flags), 5)
    assert np.array_equal(pixels(generate(engine, scheduler=name, seed=5)), expected)


def test_uniform_schedule_overrides_a_model_config_that_turns_karras_on():
    from sd_core.schedulers import build_scheduler

    base = {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "num_train_timesteps": 1000}
    assert build_scheduler("Euler", base).config.use_karras_sigmas is False
    karras = build_scheduler("Euler Karras", {**base, "use_karras_sigmas": False})
    assert karras.config.use_karras_sigmas is True and karras.config.use_exponential_sigmas is False
