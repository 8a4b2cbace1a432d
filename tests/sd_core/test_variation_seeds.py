"""Variation seeds (A1111's subseed, subseed_strength) on the tiny models: the initial noise slerps from the seed's to
the subseed's, 0 being the seed's image and 1 the subseed's, pixel for pixel."""

import io

import numpy as np
import pytest
from PIL import Image

import sd_core.denoise
from sd_core.outputs import read_parameters
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext as a1111

PROMPT = "a red fox in the snow"


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    values = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 3, "guidance_scale": 7.0, "width": 64,
              "height": 64, "scheduler": "Euler", **fields}
    return engine.generate(GenerationRequest(**values))


@pytest.fixture
def latents_built(monkeypatch):
    """Counts the calls that build their own initial noise (so a test knows the variation path ran)."""
    calls = []
    original = sd_core.denoise.variation_latents

    def spy(pipe, jobs, generators):
        calls.append(len(generators))
        return original(pipe, jobs, generators)

    monkeypatch.setattr(sd_core.denoise, "variation_latents", spy)
    return calls


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_strength_0_is_the_seed_image_exactly_ancestral_noise_included(engine, model, latents_built):
    # Euler a draws fresh noise every step from the seed's generator: it must continue where the pipeline's own
    # initial draw would have left it.
    plain = generate(engine, model=model, scheduler="Euler a", seed=11)
    varied = generate(engine, model=model, scheduler="Euler a", seed=11, subseed=99, subseed_strength=0.0)
    assert latents_built == [1], "the variation path did not run"
    assert np.array_equal(pixels(varied), pixels(plain))
    assert "Variation seed" not in varied.parameters  # as A1111: written only when the strength is above 0
    assert varied.subseeds is None


def test_strength_1_is_the_subseed_image_equal_to_bare_diffusers(engine, tiny_bucket, latents_built):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    varied = generate(engine, seed=5, subseed=42, subseed_strength=1.0)
    assert latents_built == [1]
    assert np.array_equal(pixels(varied), pixels(generate(engine, seed=42)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    with torch.inference_mode():
        bare = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64,
                    generator=torch.Generator("cpu").manual_seed(42), output_type="pil").images[0]
    assert np.array_equal(pixels(varied), np.asarray(bare.convert("RGB"), dtype=np.float32))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_half_strength_differs_from_both_and_is_deterministic(engine, model):
    seed_image = pixels(generate(engine, model=model, seed=5))
    subseed_image = pixels(generate(engine, model=model, seed=6))
    half = generate(engine, model=model, seed=5, subseed=6, subseed_strength=0.5)
    assert np.abs(pixels(half) - seed_image).mean() > 0.5
    assert np.abs(pixels(half) - subseed_image).mean() > 0.5
    again = generate(engine, model=model, seed=5, subseed=6, subseed_strength=0.5)
    assert np.array_equal(pixels(again), pixels(half))
    quarter = generate(engine, model=model, seed=5, subseed=6, subseed_strength=0.25)
    assert np.abs(pixels(quarter) - seed_image).mean() < np.abs(pixels(half) - seed_image).mean()


def test_slerp_ends_and_norm():
    import torch

    low = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    high = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(sd_core.denoise.slerp(0.0, low, high), low)
    assert torch.equal(sd_core.denoise.slerp(1.0, low, high), high)
    mid = sd_core.denoise.slerp(0.5, low, high)
    # Along each arc (channel, latent column) the norm stays between the ends' (no shrinking toward 0 as lerp does).
    norms = [x.norm(dim=2) for x in (low, high, mid)]
    assert bool((norms[2] >= torch.minimum(norms[0], norms[1]) * 0.99).all())
    assert torch.equal(sd_core.denoise.slerp(0.5, low, low), low)  # parallel vectors: linear, no NaN


def test_image_i_uses_subseed_plus_i_and_the_infotext_says_so(engine):
    batch = generate(engine, seed=20, subseed=30, subseed_strength=0.4, num_outputs=2)
    assert batch.subseeds == [30, 31] and batch.seeds == [20, 21]
    alone = generate(engine, seed=21, subseed=31, subseed_strength=0.4)
    assert np.abs(pixels(batch, 1) - pixels(alone)).max() <= 2  # batch-size dependent kernels only
    for index, (seed, subseed) in enumerate([(20, 30), (21, 31)]):
        got = a1111.parse(read_parameters(batch.images[index].data))
        assert (got["Seed"], got["Variation seed"], got["Variation seed strength"]) == (str(seed), str(subseed),
                                                                                        "0.4")
    assert batch.request.subseed == 30 and batch.request.subseed_strength == 0.4


def test_random_subseed_is_reported_and_the_infotext_alone_remakes_the_image(engine):
    result = generate(engine, seed=3, subseed_strength=0.7)  # no subseed: a random one, as A1111's -1
    assert result.subseeds is not None and result.request.subseed == result.subseeds[0]
    got = a1111.parse(result.parameters)
    again = generate(engine, seed=int(got["Seed"]), subseed=int(got["Variation seed"]),
                     subseed_strength=float(got["Variation seed strength"]))
    assert np.array_equal(pixels(again), pixels(result))

