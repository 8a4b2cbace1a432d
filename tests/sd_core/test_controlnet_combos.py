"""ControlNet with the rest (sd_core/controlnet_modes.py): "My prompt is more important" (soft injection), the hires
fix (both passes, hr_option), the refiner (base pass only), tiling (UNet and VAE only), SDXL Union ControlNets; each
equal to bare diffusers doing the same."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.controlnet_modes import soft_scales
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest
from tests.fixtures.controlnet import BareControlNet as Bare
from tests.fixtures.controlnet import as_array, picture, unit
from tests.fixtures.images import png_b64 as b64

PROMPT = "a house"
FAST = {"prompt": PROMPT, "seed": 5, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler", "model": "tiny-sd15"}
LANCZOS = Image.Resampling.LANCZOS


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    return pixels(engine.generate(GenerationRequest(**{**FAST, **fields})))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    return Bare(tiny_bucket)


@pytest.fixture(scope="module")
def plain(engine):
    return generate(engine)


# --- My prompt is more important -----------------------------------------------------------------------------------
def test_soft_scales_are_the_extensions():
    sd15 = soft_scales(13)
    assert sd15[-1] == 1.0 and sd15[0] == pytest.approx(0.825 ** 12) and sd15[11] == pytest.approx(0.825)
    assert soft_scales(10) == sd15[:10]  # SDXL: the first 10 of the same list (its middle block at 0.825**3)


def test_prompt_mode_equals_bare_diffusers_with_scaled_residuals(engine, bare, plain):
    balanced = generate(engine, controlnets=[unit(scale=0.9)])
    soft = generate(engine, controlnets=[unit(scale=0.9, mode="prompt")])
    net = bare.net("tiny-sd15-control-a")

    def scale_residuals(_module, _args, output):  # the extension's soft injection, written out for the test
        down, mid = output
        count = len(down) + 1
        factors = [0.825 ** (12 - i) for i in range(count)]
        return [d * f for d, f in zip(down, factors, strict=False)], mid * factors[-1]

    hook = net.register_forward_hook(scale_residuals)
    expected = Bare.run(bare.make(controlnet=net), image=picture(1), num_inference_steps=2, width=64, height=64,
                        controlnet_conditioning_scale=0.9)
    hook.remove()
    assert np.array_equal(soft, as_array(expected))
    assert np.abs(soft - balanced).mean() > 0.5 and np.abs(soft - plain).mean() > 0.5
    assert np.array_equal(generate(engine, controlnets=[unit(scale=0, mode="prompt")]), plain)
    # A1111: control_mode 1 / "My prompt is more important"
    for mode in (1, "My prompt is more important"):
        request = a1111.to_request(a1111.parse_call({
            "prompt": PROMPT, "seed": 5, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
            "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-control-a", "image": b64(picture(1)),
                                                          "weight": 0.9, "control_mode": mode}]}}}))
        assert pixels(engine.generate(request)).tobytes() == soft.tobytes()


def test_prompt_and_balanced_units_mix_but_not_with_control(engine):
    mixed = generate(engine, controlnets=[unit(mode="prompt"), unit("tiny-control-b", seed=2)])
    assert mixed.shape == (64, 64, 3)
    with pytest.raises(InvalidRequest, match="controlnets: 'control'"):
        generate(engine, controlnets=[unit(mode="control"), unit("tiny-control-b", seed=2)])
    with pytest.raises(InvalidRequest, match="used by two units"):
        generate(engine, controlnets=[unit(mode="prompt"), unit(seed=2)])


# --- hires fix ----------------------------------------------------------------------------------------------------
HIRES = {"scale": 2, "upscaler": "Lanczos", "denoising_strength": 0.75}  # second pass: 2 of a 3-step schedule


def bare_hires(bare, first_net=None, second_net=None, soft_second=False):
    """txt2img (with the ControlNet or not) -> Lanczos x2 -> img2img (with it, its map resized to 128, or not)."""
    first = (Bare.run(bare.make(controlnet=first_net), image=picture(1), num_inference_steps=2, width=64, height=64)
             if first_net is not None else Bare.run(bare.make(), num_inference_steps=2, width=64, height=64))
    init = first.resize((128, 128), LANCZOS)
    if second_net is None:
        return as_array(Bare.run(bare.make("Img2Img"), image=init, strength=0.75, num_inference_steps=3))
    hook = None
    if soft_second:
        hook = second_net.register_forward_hook(
            lambda _m, _a, out: ([d * 0.825 ** (12 - i) for i, d in enumerate(out[0])],
                                 out[1] * 0.825 ** (12 - len(out[0]))))
    # the unit's scale (1.0) given explicitly: diffusers' img2img ControlNet pipelines default to 0.8
    image = Bare.run(bare.make("Img2Img", controlnet=second_net), image=init, strength=0.75, num_inference_steps=3,
                     control_image=picture(1).resize((128, 128), LANCZOS), controlnet_conditioning_scale=1.0)
    if hook is not None:
        hook.remove()
    return as_array(image)


def test_hires_applies_the_unit_in_both_passes_as_bare_diffusers(engine, bare):
    result = generate(engine, hires=HIRES, controlnets=[unit()])
    net = bare.net("tiny-sd15-control-a")
    assert np.array_equal(result, bare_hires(bare, net, net))


def test_hires_second_pass_is_steered(engine):
    both = generate(engine, hires=HIRES, controlnets=[unit()])
    first_only = generate(engine, hires=HIRES, controlnets=[unit(hires_option="low_res_only")])
    assert np.abs(both - first_only).mean() > 0.5
    assert np.abs(both - generate(engine, hires=HIRES)).mean() > 0.5


@pytest.mark.parametrize("option", ["low_res_only", "high_res_only"])
def test_hires_option_limits_the_unit_to_one_pass(engine, bare, option):
    result = generate(engine, hires=HIRES, controlnets=[unit(hires_option=option)])
    net = bare.net("tiny-sd15-control-a")
    expected = bare_hires(bare, net if option == "low_res_only" else None, net if option == "high_res_only" else None)
    assert np.array_equal(result, expected)
    # A1111's hr_option, by the extension's names
    request = a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "seed": 5, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "sampler_name": "Euler",
        "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.75,
        "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
        "alwayson_scripts": {"controlnet": {"args": [{
            "model": "tiny-control-a", "image": b64(picture(1)),
            "hr_option": {"low_res_only": "Low res only", "high_res_only": "High res only"}[option]}]}}}))
    assert request.controlnets[0].hires_option == option
    assert pixels(engine.generate(request)).tobytes() == result.tobytes()


def test_hires_canny_unit_is_soft_in_the_second_pass(engine, bare):
    """The extension soft-injects canny units in the hires pass: the same as a 'none' unit on the edge map there."""
    shapes = Image.new("RGB", (64, 64))
    shapes.paste((255, 255, 255), (16, 16, 48, 40))
    canny = generate(engine, hires=HIRES, controlnets=[{"model": "tiny-control-a", "image": b64(shapes),
                                                       "preprocessor": "canny"}])
    from sd_core.control_images import canny as edges

    edge_map = b64(Image.fromarray(edges(np.asarray(shapes), 100, 200)).convert("RGB"))
    balanced = generate(engine, hires=HIRES, controlnets=[{"model": "tiny-control-a", "image": edge_map}])
    assert np.abs(canny - balanced).mean() > 0.1  # the second pass differs: soft there


# --- refiner, tiling ----------------------------------------------------------------------------------------------
def test_refiner_pass_runs_without_the_controlnet(engine, tiny_bucket):
    """A1111's extension hooks the base model's UNet only: the base pass (ensemble: to the switch) is steered, the
    refiner pass is plain."""
    import diffusers
    import torch

    xl = Bare(tiny_bucket, "sdxl")
    net = xl.net("tiny-sdxl-control-a")
    request = {**FAST, "model": "tiny-sdxl", "num_inference_steps": 4}
    result = generate(engine, **request, refine="expert_ensemble_refiner", high_noise_frac=0.5,
                      controlnets=[unit("tiny-xl-control")])
    latents = Bare.run(xl.make(controlnet=net), image=picture(1), num_inference_steps=4, width=64, height=64,
                       denoising_end=0.5, output_type="latent")
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_bucket / "tiny-sdxl-refiner" / "diffusers", text_encoder_2=xl.pipe.text_encoder_2, vae=xl.pipe.vae,
        local_files_only=True)
    refiner.set_progress_bar_config(disable=True)
    refiner.scheduler = diffusers.EulerDiscreteScheduler.from_config(refiner.scheduler.config,
                                                                     timestep_spacing="linspace")
    with torch.inference_mode():
        expected = refiner(PROMPT, guidance_scale=7.0, num_inference_steps=4, denoising_start=0.5,
                           image=latents[None] if latents.ndim == 3 else latents,
                           generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(result, as_array(expected))


def test_tiling_pads_the_unet_and_vae_but_not_the_controlnet(engine, bare):
    """A1111 sets circular padding on the layers of the checkpoint it loaded (UNet, VAE); the extension's
    ControlNet is not among them."""
    import torch

    result = generate(engine, tiling=True, controlnets=[unit()])
    pipe = bare.make(controlnet=bare.net("tiny-sd15-control-a"))
    layers = [m for m in [*pipe.unet.modules(), *pipe.vae.modules()] if isinstance(m, torch.nn.Conv2d)]
    for layer in layers:
        layer.padding_mode = "circular"
    try:
        expected = Bare.run(pipe, image=picture(1), num_inference_steps=2, width=64, height=64)
    finally:
        for layer in layers:
            layer.padding_mode = "zeros"
    assert np.array_equal(result, as_array(expected))
    assert np.abs(result - generate(engine, controlnets=[unit()])).mean() > 0.5


# --- Union ControlNet (SDXL) ----------------------------------------------------------------------------------------
def test_union_controlnet_equals_bare_diffusers_union_pipeline(engine, tiny_bucket):
    xl = Bare(tiny_bucket, "sdxl")
    pipe = xl.make(controlnet=xl.net("tiny-sdxl-control-union", union=True), union=True)
    request = {**FAST, "model": "tiny-sdxl"}
    canny = generate(engine, **request, controlnets=[unit("tiny-xl-control-union", control_type="canny", scale=0.8)])
    expected = Bare.run(pipe, control_image=[picture(1)], control_mode=[3], num_inference_steps=2, width=64, height=64,
                        controlnet_conditioning_scale=0.8)
    assert np.array_equal(canny, as_array(expected))
    depth = generate(engine, **request, controlnets=[unit("tiny-xl-control-union", control_type="depth", scale=0.8)])
    assert np.abs(depth - canny).mean() > 0.5  # the control type steers
    # A1111: the extension's union_control_type
    from_a1111 = a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "seed": 5, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
        "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-xl-control-union", "image": b64(picture(1)),
                                                      "weight": 0.8, "union_control_type": "Hard Edge"}]}}}))
    assert pixels(engine.generate(from_a1111)).tobytes() == canny.tobytes()
    img2img = generate(engine, **request, image=b64(picture(7)), strength=0.9,
                       controlnets=[unit("tiny-xl-control-union", control_type="canny")])
    expected = Bare.run(xl.make("Img2Img", controlnet=pipe.controlnet, union=True), image=picture(7), strength=0.9,
                        control_image=[picture(1)], control_mode=[3], num_inference_steps=2,
                        controlnet_conditioning_scale=1.0)  # the unit's scale (diffusers' img2img default: 0.8)
    assert np.array_equal(img2img, as_array(expected))


def test_union_refusals(engine):
    request = {**FAST, "model": "tiny-sdxl"}
    with pytest.raises(InvalidRequest, match="controlnets.0.control_type: Union ControlNet .* needs a control_type"):
        generate(engine, **request, controlnets=[unit("tiny-xl-control-union")])
    with pytest.raises(InvalidRequest, match="controlnets.0.control_type: ControlNet 'tiny-xl-control' is no Union"):
        generate(engine, **request, controlnets=[unit("tiny-xl-control", control_type="depth")])
    with pytest.raises(InvalidRequest, match="runs alone"):
        generate(engine, **request, controlnets=[unit("tiny-xl-control-union", control_type="depth"),
                                                 unit("tiny-xl-control")])
