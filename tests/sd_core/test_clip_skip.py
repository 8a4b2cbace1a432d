"""Clip skip (`clip_skip`, A1111's CLIP_stop_at_last_layers): A1111's meaning (prompt and negative prompt from the
same earlier CLIP layer) on SD1.x, equal to bare diffusers given those embeddings; refused for SDXL (A1111 ignores it
there); written in the infotext, never batched with another clip skip."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest
from tests.fixtures import a1111_infotext

PROMPT = "a red fox in the snow"
FAST = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, "guidance_scale": 7.0, "width": 64, "height": 64,
        "scheduler": "Euler"}


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def bare_image(tiny_bucket, clip_skip: int | None = None) -> np.ndarray:
    """The same SD1.5 generation through bare diffusers (no sd_core involved). With a clip skip, the prompt and the
    (empty) negative prompt are both encoded from the hidden state `clip_skip` layers before the last, through the
    final layer norm (A1111's clip skip; diffusers' own `clip_skip` would skip the prompt only), and passed as
    prompt_embeds / negative_prompt_embeds."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    kwargs = {"prompt": PROMPT}
    with torch.inference_mode():
        if clip_skip:
            def embed(text):
                ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
                states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
                return pipe.text_encoder.final_layer_norm(states)

            kwargs = {"prompt_embeds": embed(PROMPT), "negative_prompt_embeds": embed("")}
        image = pipe(num_inference_steps=2, guidance_scale=7.0, width=64, height=64, output_type="pil",
                     generator=torch.Generator("cpu").manual_seed(3), **kwargs).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def a1111_request(arch: str, stop_at: int) -> GenerationRequest:
    return a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "seed": 3, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": f"tiny-{arch}", "CLIP_stop_at_last_layers": stop_at},
    }))


def test_clip_skip_equals_bare_diffusers(engine, tiny_bucket):
    expected = bare_image(tiny_bucket, clip_skip=1)
    native = engine.generate(GenerationRequest(**FAST, model="tiny-sd15", clip_skip=1))
    from_a1111 = engine.generate(a1111_request("sd15", 2))  # A1111's 2 = the penultimate layer = one skipped
    plain = engine.generate(a1111_request("sd15", 1))  # A1111's 1 = no skip
    assert np.array_equal(pixels(native), expected)
    assert np.array_equal(pixels(from_a1111), expected)
    assert np.array_equal(pixels(plain), bare_image(tiny_bucket))
    assert np.abs(pixels(native) - pixels(plain)).mean() > 0.5  # clip skip changes the image
    # the deepest skip the schema allows still leaves one layer of the 12-layer tiny encoder
    assert engine.generate(GenerationRequest(**FAST, model="tiny-sd15", clip_skip=11)).images


def test_clip_skip_is_refused_for_sdxl(engine):
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(GenerationRequest(**FAST, model="tiny-sdxl", clip_skip=1))
    message = str(caught.value)
    assert message.startswith("clip_skip: 'tiny-sdxl' is a sdxl model, which takes no clip skip"), message
    assert a1111.rename_fields(message).startswith("override_settings.CLIP_stop_at_last_layers: 'tiny-sdxl'")
    assert engine.generate(GenerationRequest(**FAST, model="tiny-sdxl", clip_skip=0)).images


def test_infotext_writes_a1111_clip_skip_only_when_skipping(engine):
    skipped = engine.generate(GenerationRequest(**FAST, clip_skip=1))
    parsed = a1111_infotext.parse(skipped.parameters)
    assert parsed["Clip skip"] == "2"
    assert ", Clip skip: 2, " in skipped.parameters
    assert "Clip skip" not in engine.generate(GenerationRequest(**FAST)).parameters  # A1111 omits its default 1
    assert skipped.request.clip_skip == 1


@pytest.mark.parametrize(("stop_at", "skip"), [(None, 0), (1, 0), (2, 1), (12, 11)])
def test_a1111_clip_stop_at_last_layers_translation(stop_at, skip):
    overrides = {} if stop_at is None else {"CLIP_stop_at_last_layers": stop_at}
    assert a1111.to_request(a1111.parse_call({"steps": 2, "override_settings": overrides})).clip_skip == skip


@pytest.mark.parametrize("value", [0, 13, -1, 2.5, "2", True, [2]])
def test_a1111_bad_clip_stop_at_last_layers_is_refused(value):
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(a1111.parse_call({"steps": 2, "override_settings": {"CLIP_stop_at_last_layers": value}}))
    assert "override_settings.CLIP_stop_at_last_layers: must be a whole number from 1 (no skip) to 12" in str(
        caught.value)


@pytest.mark.parametrize(("data", "reason"), [({"clip_skip": 12}, "11"), ({"clip_skip": -1}, "0"),
                                              ({"clip_skip": "two"}, "integer")])
def test_native_clip_skip_bounds(data, reason):
    from sd_core.schema import parse_request

    with pytest.raises(InvalidRequest) as caught:
        parse_request(data)
    assert str(caught.value).startswith("clip_skip: ") and reason in str(caught.value)


def test_different_clip_skips_are_not_batched_together(engine_settings, engine):
    from sd_core.engine import Engine
    from tests.sd_core.test_batching import run_concurrently

    batching = Engine(dataclasses.replace(engine_settings, max_batch_images=8, batch_wait_ms=500))
    requests = [GenerationRequest(**{**FAST, "seed": seed}, clip_skip=skip) for seed, skip in enumerate((0, 1, 0, 1))]
    results = run_concurrently(batching, requests)
    assert all(not isinstance(r, Exception) for r in results), results
    assert max(r.timings["batch_size"] for r in results) > 1, "nothing was batched"
    assert all(r.timings["batch_size"] <= 2 for r in results)  # only equal clip skips together
    for request, result in zip(requests, results, strict=True):
        assert np.abs(pixels(result) - pixels(engine.generate(request))).max() <= 2  # batch kernels only
