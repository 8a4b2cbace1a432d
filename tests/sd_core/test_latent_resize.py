"""resize_mode latent (A1111's img2img resize mode 3, latent upscale): equal to bare diffusers given the resized latent,
the same from an A1111 payload, refused where it cannot be honoured."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core.a1111 import A1111Call, to_request
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest, parse_request
from tests.fixtures.images import box_mask, noise_image
from tests.fixtures.images import png_b64 as png

PROMPT = "a red fox in the snow"
SEED, STEPS, CFG, STRENGTH = 3, 3, 7.0, 0.9
SETTINGS = {"num_inference_steps": STEPS, "guidance_scale": CFG, "scheduler": "Euler", "strength": STRENGTH}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def init() -> Image.Image:
    return noise_image((48, 40), seed=5)  # another size and aspect than the 64x64 output


def native(engine, init, **fields):
    return engine.generate(GenerationRequest(**{
        "prompt": PROMPT, "seed": SEED, "image": png(init), "width": 64, "height": 64, "resize_mode": "latent",
        **SETTINGS, **fields}))


def bare_diffusers(tiny_bucket, arch: str, init: Image.Image) -> np.ndarray:
    """Plain diffusers: the image encoded at its own size with the seed's generator, the latent resized bilinearly
    (torch), then the img2img pipeline given that latent as `image`."""
    import torch
    import torch.nn.functional as F
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if arch == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    assert getattr(pipe.vae.config, "latents_mean", None) is None  # plain scaling factor, as written below
    generator = torch.Generator("cpu").manual_seed(SEED)
    with torch.inference_mode():
        encoded = pipe.vae.encode(pipe.image_processor.preprocess(init))  # fp32 on CPU: no upcast to do
        latent = encoded.latent_dist.sample(generator=generator) * pipe.vae.config.scaling_factor
        assert latent.shape[-2:] == (40 // 8, 48 // 8)
        latent = F.interpolate(latent, size=(64 // 8, 64 // 8), mode="bilinear")
        out = pipe(prompt=PROMPT, image=latent, strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=CFG,
                   generator=[generator]).images[0]
    return np.asarray(out.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_latent_resize_equals_bare_diffusers(engine, tiny_bucket, init, arch):
    result = native(engine, init, model=f"tiny-{arch}")
    ours = pixels(result)
    assert ours.shape == (64, 64, 3)
    np.testing.assert_allclose(ours, bare_diffusers(tiny_bucket, arch, init), atol=1)
    if arch == "sd15":  # not the pixel resize under another name
        resized = pixels(native(engine, init, model="tiny-sd15", resize_mode="resize"))
        assert np.abs(ours - resized).mean() > 1


def test_a1111_resize_mode_3_is_the_native_latent_resize(engine, init):
    payload = {"prompt": PROMPT, "init_images": [png(init)], "resize_mode": 3, "width": 64, "height": 64,
               "steps": STEPS, "cfg_scale": CFG, "sampler_name": "Euler", "scheduler": "Automatic", "seed": SEED,
               "denoising_strength": STRENGTH, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}
    request = to_request(A1111Call("img2img", payload))
    assert request.resize_mode == "latent"
    np.testing.assert_array_equal(pixels(engine.generate(request)), pixels(native(engine, init, model="tiny-sd15")))


@pytest.mark.parametrize(("fields", "message"), [
    ({"mask": "x"}, "resize_mode: latent is for img2img without a mask"),
    ({"outpaint": {"left": 8}}, "resize_mode: latent is for img2img without a mask"),
    ({"controlnets": [{"model": "c", "image": "x"}]}, "resize_mode: latent is for img2img without a mask"),
    ({"image": None}, "resize_mode: needs an image"),
])
def test_latent_resize_combos_are_refused(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request({"prompt": "a", "image": "x", "resize_mode": "latent", **fields})


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_latent_resize_is_refused_for_other_latents(engine, init, model):
    with pytest.raises(InvalidRequest, match=f"^resize_mode: '{model}' is a .* model, which has no latent resize"):
        engine.prepare(GenerationRequest(prompt="a", image=png(init), resize_mode="latent", model=model, **SETTINGS))


def test_a1111_latent_resize_with_a_mask_or_out_of_range_is_refused(init):
    payload = {"prompt": "a", "init_images": [png(init)], "resize_mode": 3, "mask": png(box_mask((8, 8, 24, 24),
                                                                                               (48, 40)))}
    with pytest.raises(InvalidRequest, match="resize_mode: latent is for img2img without a mask"):
        to_request(A1111Call("img2img", payload))
    with pytest.raises(InvalidRequest, match=r"resize_mode: must be a whole number from 0 to 3 \(got 4\)"):
        to_request(A1111Call("img2img", {**payload, "resize_mode": 4}))


def test_init_image_beyond_the_pixel_budget_is_refused(make_engine, init):
    small = make_engine(max_pixels=64 * 64)
    big = noise_image((80, 64))  # 5120 pixels: encoded at its own size it would exceed the budget
    with pytest.raises(InvalidRequest, match=r"^image: 80x64 = 5120 pixels; resize_mode latent"):
        small.prepare(GenerationRequest(prompt="a", image=png(big), width=64, height=64, resize_mode="latent",
                                        model="tiny-sd15", **SETTINGS))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_encoding_is_diffusers_own_in_half_precision(tiny_bucket, arch):
    """At the output size (the resize is then the identity) in bfloat16, SDXL's VAE upcast included: the latents,
    noised by the pipeline's own prepare_latents, equal those it makes from the pixel image with the same seed."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from sd_core.latent_resize import init_latents

    cls = StableDiffusionXLImg2ImgPipeline if arch == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True,
                               torch_dtype=torch.bfloat16)
    assert arch != "sdxl" or pipe.vae.config.force_upcast
    image = noise_image((64, 64), seed=9)
    pipe.scheduler.set_timesteps(STEPS)
    timestep = pipe.scheduler.timesteps[:1]

    def noised(value, generator):
        return pipe.prepare_latents(value, timestep, 1, 1, torch.bfloat16, torch.device("cpu"), [generator])

    with torch.inference_mode():
        theirs = noised(pipe.image_processor.preprocess(image), torch.Generator("cpu").manual_seed(SEED))
        generator = torch.Generator("cpu").manual_seed(SEED)
        ours = noised(init_latents(pipe, image, 64, 64, [generator]), generator)
    assert pipe.vae.dtype == torch.bfloat16  # put back after the upcast
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
