"""Hires fix (`hires`, A1111's enable_hr): first pass, upscale (latent or pixels), img2img second pass; equal to the
bare diffusers sequence; sizes, steps, progress, budget and refusals."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import Cancelled, InvalidRequest
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext

PROMPT = "a red fox in the snow"
FAST = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler"}


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, hires=None, **fields):
    return engine.generate(GenerationRequest(**{**FAST, **fields}, hires=hires))


@pytest.fixture(scope="module")
def bare_pipes(tiny_bucket):
    """tiny-sd15 through bare diffusers: its txt2img pipeline and the img2img pipeline sharing its weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return pipe, img2img


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_is_the_scale_times_the_size_and_reproducible(engine, upscaler):
    hires = {"scale": 2, "upscaler": upscaler, "denoising_strength": 0.5}
    result = generate(engine, hires=hires)
    assert (result.images[0].width, result.images[0].height) == (128, 128)
    assert np.array_equal(pixels(generate(engine, hires=hires)), pixels(result))
    settings = a1111_infotext.parse(result.parameters)
    assert (settings["Size-1"], settings["Size-2"]) == ("64", "64")  # A1111's Size is the first pass's
    assert settings["Hires upscale"] == "2" and settings["Hires upscaler"] == upscaler
    assert settings["Denoising strength"] == "0.5" and "Hires steps" not in settings


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Nearest"])
def test_hires_equals_the_bare_diffusers_sequence(engine, bare_pipes, upscaler):
    """txt2img (latents or pixels) -> upscale -> img2img with fresh generators of the same seeds, pixel for pixel.
    Strength 0.5 and 3 hires steps: a schedule of 6, of which img2img runs the last 3 (A1111's hires steps)."""
    import torch

    pipe, img2img = bare_pipes
    hires = {"scale": 1.5, "upscaler": upscaler, "steps": 3, "denoising_strength": 0.5}
    result = generate(engine, hires=hires, seed=7, num_outputs=2)
    common = {"prompt": [PROMPT] * 2, "guidance_scale": 7.0}
    latent = upscaler.startswith("Latent")

    def generators():
        return [torch.Generator("cpu").manual_seed(s) for s in (7, 8)]

    with torch.inference_mode():
        first = pipe(**common, num_inference_steps=2, width=64, height=64, generator=generators(),
                     output_type="latent" if latent else "pil").images
        if latent:
            init = torch.nn.functional.interpolate(first, size=(12, 12), mode="bicubic", antialias=True)
        else:
            init = [image.resize((96, 96), resample=Image.Resampling.NEAREST) for image in first]
        bare = img2img(**common, image=init, strength=0.5, num_inference_steps=6, generator=generators()).images
    for index in range(2):
        assert result.images[index].width == 96
        assert np.array_equal(pixels(result, index), np.asarray(bare[index].convert("RGB"), dtype=np.float32))
    settings = a1111_infotext.parse(result.parameters)
    assert settings["Hires steps"] == "3" and settings["Hires upscale"] == "1.5"


def test_hires_differs_from_a_plain_upscale(engine):
    """The second pass really runs: a Lanczos upscale alone is not the result."""
    plain = generate(engine)
    upscaled = np.asarray(Image.open(io.BytesIO(plain.images[0].data)).convert("RGB").resize(
        (128, 128), resample=Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(pixels(generate(engine, hires={"upscaler": "Lanczos"})) - upscaled).mean() > 0.5


@pytest.mark.parametrize(("resize", "size", "written"), [
    ((96, 0), (96, 96), "96x0"),  # one side given: the other keeps the aspect
    ((0, 128), (128, 128), "0x128"),
    ((128, 96), (128, 96), "128x96"),  # both: cover, then the centre cropped (whole latent cells)
])
def test_resize_overrides_the_scale(engine, resize, size, written):
    result = generate(engine, hires={"scale": 4, "width": resize[0], "height": resize[1]})
    assert (result.images[0].width, result.images[0].height) == size
    settings = a1111_infotext.parse(result.parameters)
    assert settings["Hires resize-1"] + "x" + settings["Hires resize-2"] == written
    assert "Hires upscale" not in settings


def test_progress_counts_both_passes(engine):
    seen = []
    hires = {"steps": 3, "denoising_strength": 0.5}
    engine.generate(GenerationRequest(**FAST, hires=hires), on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(step, 5) for step in range(1, 6)]


def test_second_pass_steps_default_to_the_first_passes(engine):
    seen = []
    engine.generate(GenerationRequest(**FAST, hires={"denoising_strength": 0.7}),
                    on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(step, 4) for step in range(1, 5)]


# Checks: one per step (first pass: 2), one after stage 5, two in the hires post-pass (before and after the upscale),
# one per second-pass step. 2: cancelled after the first pass; 5: at the end of the second pass's first step.
@pytest.mark.parametrize("checks_before", [2, 5])
def test_cancel_between_and_during_passes(engine, checks_before):
    calls, seen = [], []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > checks_before

    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(**FAST, hires={"denoising_strength": 0.5}), should_cancel=should_cancel,
                        on_step=lambda done, total: seen.append(done))
    assert len(calls) == checks_before + 1
    assert seen == [1, 2]  # a step is reported after its cancel check


def test_a_hires_prompt_must_repeat_the_prompts_lora_tags(engine):
    request = GenerationRequest(**{**FAST, "prompt": "a fox <lora:tiny-style:0.5>"}, hires={"prompt": "a dog"})
    with pytest.raises(InvalidRequest, match=r"^hires.prompt: its <lora:...> tags must be the prompt's"):
        engine.prepare(request)


def test_budget_names_the_final_size(make_engine):
    engine = make_engine(max_pixels=100 * 100)
    with pytest.raises(InvalidRequest, match="128x128") as error:
        engine.prepare(GenerationRequest(**FAST, hires={"scale": 2}))
    assert str(error.value).startswith("num_outputs: ")


def test_unknown_upscaler_is_refused_with_the_valid_names(engine):
    with pytest.raises(InvalidRequest) as error:
        engine.prepare(GenerationRequest(**FAST, hires={"upscaler": "R-ESRGAN 4x+"}))
    message = str(error.value)
    assert message.startswith("hires.upscaler: unknown upscaler 'R-ESRGAN 4x+'")
    assert "Latent (nearest-exact)" in message and "Lanczos" in message


@pytest.mark.parametrize(("fields", "expected"), [
    ({"image": "data:image/png;base64,AAAA"}, "txt2img only"),
    ({"subseed": 5, "subseed_strength": 0.5}, "variation seeds"),
])
def test_hires_combinations_refused(fields, expected):
    with pytest.raises(Exception, match=expected):
        GenerationRequest(**FAST, **fields, hires={})


def test_second_pass_sampler_prompt_and_cfg_are_written(engine):
    hires = {"scheduler": "DPM++ 2M Karras", "prompt": "a fox, detailed", "guidance_scale": 5, "steps": 2}
    settings = a1111_infotext.parse(generate(engine, hires=hires).parameters)
    assert settings["Hires sampler"] == "DPM++ 2M" and settings["Hires schedule type"] == "Karras"
    assert settings["Hires prompt"] == "a fox, detailed" and settings["Hires CFG Scale"] == "5"


def test_sdxl_latent_hires(engine):
    """SDXL's img2img takes the upscaled latents as they are too (no VAE round trip)."""
    result = generate(engine, model="tiny-sdxl", hires={"upscaler": "Latent (nearest-exact)", "scale": 1.5})
    assert (result.images[0].width, result.images[0].height) == (96, 96)
    assert np.abs(pixels(result)).mean() > 0  # not a blank image


def test_loras_and_clip_skip_apply_to_both_passes(engine, monkeypatch):
    activated, skips = [], []
    activate = engine.denoiser.loras.activate

    def spy(model, loras, **kwargs):
        activated.append(tuple(lora.label for lora in loras))
        return activate(model, loras, **kwargs)

    import sd_core.denoise

    clip_skip = sd_core.denoise._clip_skip

    def skip_spy(job, pipe):
        skips.append((type(pipe).__name__, clip_skip(job, pipe)))
        return skips[-1][1]

    monkeypatch.setattr(engine.denoiser.loras, "activate", spy)
    monkeypatch.setattr(sd_core.denoise, "_clip_skip", skip_spy)
    generate(engine, prompt=PROMPT + " <lora:tiny-style:0.5>", clip_skip=1, hires={"upscaler": "Nearest"})
    assert activated == [("tiny-style",), ("tiny-style",)]
    assert skips == [("StableDiffusionPipeline", 1), ("StableDiffusionImg2ImgPipeline", 1)]
