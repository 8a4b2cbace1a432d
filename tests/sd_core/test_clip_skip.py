"""Clip skip (`clip_skip`, A1111's CLIP_stop_at_last_layers): the image of bare diffusers' clip_skip, refused beyond
the model's text-encoder depth, written in the infotext, never batched with another clip skip."""

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


def bare_image(tiny_bucket, arch: str, clip_skip: int | None = None) -> np.ndarray:
    """The same generation through bare diffusers (no sd_core involved).

    SD1.x: diffusers' own clip_skip fails with transformers >= 5.6 (diffusers issue #14124), so its prompt embedding
    is made here as diffusers documents it: the hidden state `clip_skip` layers before the last, through the final
    layer norm; the negative (empty) prompt is encoded by the pipeline from the last layer, as diffusers does.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = {"prompt": PROMPT}
    with torch.inference_mode():
        if clip_skip and arch == "sd15":
            ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            kwargs = {"prompt_embeds": pipe.text_encoder.final_layer_norm(states)}
        elif clip_skip:
            kwargs["clip_skip"] = clip_skip
        image = pipe(num_inference_steps=2, guidance_scale=7.0, width=64, height=64, output_type="pil",
                     generator=torch.Generator("cpu").manual_seed(3), **kwargs).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def a1111_request(arch: str, stop_at: int) -> GenerationRequest:
    return a1111.to_request(a1111.parse_call({
        "prompt": PROMPT, "seed": 3, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": f"tiny-{arch}", "CLIP_stop_at_last_layers": stop_at},
    }))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_clip_skip_equals_bare_diffusers(engine, tiny_bucket, arch):
    expected = bare_image(tiny_bucket, arch, clip_skip=1)
    native = engine.generate(GenerationRequest(**FAST, model=f"tiny-{arch}", clip_skip=1))
    from_a1111 = engine.generate(a1111_request(arch, 2))  # A1111's 2 = the penultimate layer = one skipped
    plain = engine.generate(a1111_request(arch, 1))  # A1111's 1 = no skip
    assert np.array_equal(pixels(native), expected)
    assert np.array_equal(pixels(from_a1111), expected)
    assert np.array_equal(pixels(plain), bare_image(tiny_bucket, arch))
    assert np.abs(pixels(native) - pixels(plain)).mean() > 0.5  # clip skip changes the image


@pytest.mark.parametrize(("arch", "skip", "depth", "most"), [("sdxl", 11, 12, 10)])
def test_clip_skip_beyond_the_text_encoder_is_refused(engine, arch, skip, depth, most):
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(GenerationRequest(**FAST, model=f"tiny-{arch}", clip_skip=skip))
    message = str(caught.value)
    assert message.startswith("clip_skip: 'tiny-sdxl'")
    assert f"has {depth} layers, of which at most {most} can be skipped" in message
    assert f"got clip_skip {skip} (CLIP_stop_at_last_layers {skip + 1})" in message
    assert a1111.rename_fields(message).startswith("override_settings.CLIP_stop_at_last_layers: 'tiny-sdxl'")
    # the deepest allowed skip runs
    assert engine.generate(GenerationRequest(**FAST, model=f"tiny-{arch}", clip_skip=most)).images


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
