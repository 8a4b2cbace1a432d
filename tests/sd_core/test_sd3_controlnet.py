"""SD3 ControlNet (`controlnets` on tiny-sd3): equal to bare diffusers' StableDiffusion3ControlNetPipeline (one unit,
two, a start/end window), scale 0 = the plain image, same pixels on every run, the A1111 form, clear refusals."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest
from tests.fixtures.controlnet import as_array, picture
from tests.fixtures.controlnet import unit as control_unit
from tests.fixtures.images import png_b64 as b64

FAST = {"prompt": "a house", "seed": 5, "num_inference_steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64,
        "model": "tiny-sd3"}


def generate(engine, **fields) -> np.ndarray:
    result = engine.generate(GenerationRequest(**{**FAST, **fields}))
    return as_array(Image.open(io.BytesIO(result.images[0].data)))


def unit(name="tiny-sd3-control", seed=1, **extra) -> dict:
    return control_unit(name, seed, **extra)


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Bare diffusers: StableDiffusion3ControlNetPipeline from_pipe'd from the plain pipeline, the model's own
    flow-matching Euler scheduler, a CPU generator, and torch's global RNG seeded with the seed (diffusers samples
    the control image's VAE latents from it)."""
    import diffusers
    import torch

    base = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_bucket / "tiny-sd3" / "diffusers",
                                                              local_files_only=True)
    net = diffusers.SD3ControlNetModel.from_pretrained(tiny_bucket / "controlnets" / "tiny-sd3-control")

    def run(units: int = 1, **kwargs) -> np.ndarray:
        pipe = diffusers.StableDiffusion3ControlNetPipeline.from_pipe(base, controlnet=net if units == 1 else
                                                                      [net] * units)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
        torch.manual_seed(5)
        with torch.inference_mode():
            image = pipe(FAST["prompt"], num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                         generator=torch.Generator("cpu").manual_seed(5), **kwargs).images[0]
        return as_array(image)

    return run


@pytest.fixture(scope="module")
def plain(engine):
    return generate(engine)


def test_one_unit_equals_bare_diffusers_and_changes_the_image(engine, bare, plain):
    image = generate(engine, controlnets=[unit(scale=0.8)])
    assert np.array_equal(image, bare(control_image=picture(1), controlnet_conditioning_scale=0.8))
    assert np.abs(image - plain).mean() > 1.0


def test_same_request_same_pixels_whatever_the_global_rng(engine):
    import torch

    torch.manual_seed(1)
    first = generate(engine, controlnets=[unit()])
    torch.manual_seed(2)
    assert np.array_equal(first, generate(engine, controlnets=[unit()]))


def test_scale_zero_gives_exactly_the_plain_image(engine, plain):
    assert np.array_equal(generate(engine, controlnets=[unit(scale=0.0)]), plain)


def test_start_end_window_equals_bare_diffusers(engine, bare, plain):
    late = generate(engine, controlnets=[unit(start=0.5)])
    assert np.array_equal(late, bare(control_image=picture(1), control_guidance_start=0.5))
    assert not np.array_equal(late, plain) and not np.array_equal(late, generate(engine, controlnets=[unit()]))


def test_two_units_equal_bare_sd3_multicontrolnet(engine, bare):
    image = generate(engine, controlnets=[unit(scale=0.6), unit(seed=2, scale=0.4, end=0.5)])
    expected = bare(2, control_image=[picture(1), picture(2)], controlnet_conditioning_scale=[0.6, 0.4],
                    control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.5])
    assert np.array_equal(image, expected)


def test_manifest_without_t5_runs_controlnets(engine):
    without_t5 = generate(engine, model="tiny-sd3-no-t5", controlnets=[unit()])
    assert not np.array_equal(without_t5, generate(engine, model="tiny-sd3-no-t5"))
    assert engine.pool.get("tiny-sd3-no-t5").pipes[("controlnet", "txt2img")].text_encoder_3 is None


def test_a1111_controlnet_unit_equals_the_native_one(engine):
    request = a1111.to_request(a1111.parse_call({
        "prompt": FAST["prompt"], "sampler_name": "Euler", "steps": 2, "cfg_scale": 5.0, "seed": 5, "width": 64,
        "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd3"},
        "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-sd3-control", "image": b64(picture(1)),
                                                      "weight": 0.8, "guidance_end": 0.5}]}}}))
    result = engine.generate(request)
    native = generate(engine, controlnets=[unit(scale=0.8, end=0.5)])
    assert np.array_equal(as_array(Image.open(io.BytesIO(result.images[0].data))), native)
    with pytest.raises(InvalidRequest, match="balanced mode only here, not 'prompt'"):
        engine.generate(a1111.to_request(a1111.parse_call({
            "prompt": "a", "steps": 2, "width": 64, "height": 64, "override_settings": {
                "sd_model_checkpoint": "tiny-sd3"}, "alwayson_scripts": {"controlnet": {"args": [{
                    "model": "tiny-sd3-control", "image": b64(picture(1)),
                    "control_mode": "My prompt is more important"}]}}})))


@pytest.mark.parametrize(("fields", "message"), [
    ({"controlnets": [unit(mode="prompt")]},
     "controlnets.0.mode: tiny-sd3 (sd3) runs ControlNets in balanced mode only here, not 'prompt'"),
    ({"controlnets": [unit(mode="control")]},
     "controlnets.0.mode: tiny-sd3 (sd3) runs ControlNets in balanced mode only here, not 'control'"),
    ({"controlnets": [unit()], "image": b64(picture(3)), "strength": 0.5},
     "controlnets: tiny-sd3 (sd3) takes ControlNets in txt2img only here, not img2img"),
    ({"controlnets": [unit()], "image": b64(picture(3)), "mask": b64(Image.new("L", (64, 64), 255))},
     "controlnets: tiny-sd3 (sd3) takes ControlNets in txt2img only here, not inpaint"),
    ({"controlnets": [unit("tiny-control-a")]},
     "controlnets.0.model: ControlNet 'tiny-control-a' is made for another architecture (ControlNetModel, not an "
     "SD3 ControlNet) than tiny-sd3 (sd3: an MMDiT, SD3ControlNetModel)"),
    ({"controlnets": [unit("tiny-sd3-control")], "model": "tiny-sd15", "guidance_scale": 7.0},
     "controlnets.0.model: ControlNet 'tiny-sd3-control' is made for another architecture (SD3ControlNetModel: "
     "cross_attention_dim None) than tiny-sd15 (sd15: cross_attention_dim 32)"),
    ({"controlnets": [unit("tiny-xl-control-union", control_type="canny")]},
     "controlnets.0.model: tiny-sd3 (sd3) takes no Union ControlNets (SDXL only)"),
])
def test_what_sd3_controlnets_cannot_do_is_refused_clearly(engine, fields, message):
    with pytest.raises(InvalidRequest) as refused:
        generate(engine, **fields)
    assert str(refused.value) == message


def test_controlnets_without_patch_embedding_take_the_models(engine):
    """SD3.5 Large's ControlNets (use_pos_embed false) get the transformer's patch embedding, as diffusers' pipeline
    constructor gives it, also when set on the engine's existing pipeline (the family's prepare_controlnets)."""
    import torch
    from diffusers import SD3ControlNetModel

    pipe = engine.pool.get("tiny-sd3").pipeline("txt2img")
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config = {**{k: config[k] for k in SD3ControlNetModel.extract_init_dict(config)[0]}, "num_layers": 1,
              "use_pos_embed": False, "joint_attention_dim": None}
    net = SD3ControlNetModel(**config)
    assert net.pos_embed is None
    family = engine.pool.get("tiny-sd3").manifest.family
    family.prepare_controlnets(pipe, [net])
    for ours, theirs in zip(net.pos_embed.state_dict().values(), pipe.transformer.pos_embed.state_dict().values(),
                            strict=True):
        assert torch.equal(ours, theirs)
    assert family.controlnet_mismatch(pipe.transformer.config, dict(net.config)) is None
