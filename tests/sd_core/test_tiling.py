"""Seamless tiling (`tiling`, A1111's `tiling`): circular padding in the UNet and VAE for that request only, equal to
bare diffusers with circular convolutions; the image wraps at its edges; never leaks into other requests."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext

FAST = {"prompt": "a tiled floor", "seed": 5, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64,
        "height": 64, "scheduler": "Euler", "model": "tiny-sd15"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def bare_image(tiny_bucket, circular: bool) -> np.ndarray:
    """The same generation through bare diffusers, every Conv2d of its UNet and VAE set to circular padding by hand."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    if circular:
        for module in [*pipe.unet.modules(), *pipe.vae.modules()]:
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = "circular"
    with torch.inference_mode():
        image = pipe(FAST["prompt"], num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(5)).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def plain_and_tiled(engine):
    plain = engine.generate(GenerationRequest(**FAST))
    tiled = engine.generate(GenerationRequest(**FAST, tiling=True))
    return plain, tiled


def test_tiling_equals_bare_diffusers_with_circular_convolutions(plain_and_tiled, tiny_bucket):
    plain, tiled = plain_and_tiled
    assert np.array_equal(pixels(tiled), bare_image(tiny_bucket, circular=True))
    assert np.array_equal(pixels(plain), bare_image(tiny_bucket, circular=False))
    assert np.abs(pixels(tiled) - pixels(plain)).mean() > 0.5


def test_the_tiled_reference_wraps_around_its_edges(tiny_bucket):
    """What tiling means, shown on the reference the engine equals (above): with circular convolutions, initial noise
    shifted sideways by half the width gives the image shifted by half the width, so the left and right edges meet
    like any two neighbouring columns. With zero padding (no tiling) it does not."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    latents = torch.randn((1, 4, 8, 16), generator=torch.Generator("cpu").manual_seed(5))
    shift = latents.shape[-1] // 2  # a multiple of the UNet's total downsampling (8)
    errors = {}
    for mode in ("zeros", "circular"):
        for module in [*pipe.unet.modules(), *pipe.vae.modules()]:
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = mode
        images = []
        for noise in (latents, torch.roll(latents, shift, dims=3)):
            with torch.inference_mode():
                image = pipe(FAST["prompt"], num_inference_steps=2, guidance_scale=7.0, width=128, height=64,
                             latents=noise.clone()).images[0]
            images.append(np.asarray(image.convert("RGB"), dtype=np.float32))
        errors[mode] = np.abs(np.roll(images[0], shift * 8, axis=1) - images[1]).max()
    assert errors["circular"] <= 1, errors  # float rounding only
    assert errors["zeros"] > 20, errors


def test_tiling_never_leaks_into_the_next_request(engine, plain_and_tiled):
    plain, _ = plain_and_tiled
    engine.generate(GenerationRequest(**FAST, tiling=True))
    assert np.array_equal(pixels(engine.generate(GenerationRequest(**FAST))), pixels(plain))


def test_tiled_and_plain_requests_never_share_a_batch(engine_settings, plain_and_tiled):
    import dataclasses

    from sd_core.engine import Engine

    batching = Engine(dataclasses.replace(engine_settings, max_batch_images=8, batch_wait_ms=300))
    requests = [GenerationRequest(**FAST), GenerationRequest(**FAST, tiling=True)]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(index):
        barrier.wait()
        results[index] = batching.generate(requests[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [r.timings["batch_size"] for r in results] == [1, 1]
    for result, alone in zip(results, plain_and_tiled, strict=True):
        assert np.abs(pixels(result) - pixels(alone)).max() <= 2  # the batching guarantee (test_batching.py)


def test_a1111_tiling_is_honoured_and_written_in_the_infotext(engine, plain_and_tiled):
    request = a1111.to_request(a1111.parse_call({
        "prompt": FAST["prompt"], "seed": 5, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64,
        "sampler_name": "Euler", "tiling": True, "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
    }))
    assert request.tiling is True
    result = engine.generate(request)
    assert np.array_equal(pixels(result), pixels(plain_and_tiled[1]))
    assert a1111_infotext.parse(result.parameters)["Tiling"] == "True"
    assert "Tiling" not in a1111_infotext.parse(plain_and_tiled[0].parameters)
