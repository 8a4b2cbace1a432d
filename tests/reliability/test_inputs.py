"""Bad input, in process: hypothesis-generated inputs against parse_request, the A1111 translation and the engine's
preparation, and a hand-written corpus through the engine. Every case ends in InvalidRequest naming the field (never
another exception), and the engine answers a normal request right after. The corpus (NATIVE, A1111) is also sent
through both adapters' real servers by tests/reliability/test_servers.py."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

NAN, INF = float("nan"), float("inf")


def png(size=(64, 64), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    channels = {"RGB": 3, "L": 1}[mode]
    data = np.random.default_rng(0).integers(0, 255, (size[1], size[0], channels)).astype(np.uint8)
    Image.fromarray(data.squeeze() if channels == 1 else data, mode).save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims a huge size (a decoder that trusts it allocates gigabytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def zero_png(width: int, height: int) -> bytes:
    """A real, valid grayscale PNG of zeros: tiny on the wire, width*height bytes once decoded."""
    compressor, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_PNG = png()
IMAGE = b64(GOOD_PNG)
MASK_32 = b64(png((32, 32), "L"))
BOMB_HEADER = b64(png_declaring(100_000, 100_000))
BOMB_REAL = b64(zero_png(6000, 6000))
TRUNCATED = b64(GOOD_PNG[: len(GOOD_PNG) // 2])

# (payload, the field its error must name). Native GenerationRequest inputs.
NATIVE = [
    ({"prompt": "x" * 10_001}, "prompt"),
    ({"prompt": "a fox " * 200_000}, "prompt"),
    ({"prompt": {"text": "a fox"}}, "prompt"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
    ({"guidance_scale": NAN}, "guidance_scale"),
    ({"guidance_scale": INF}, "guidance_scale"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"guidance_scale": "NaN"}, "guidance_scale"),
    ({"strength": -INF, "image": IMAGE}, "strength"),
    ({"strength": 0, "image": IMAGE}, "strength"),
    ({"width": -64}, "width"),
    ({"width": 8, "height": 100_000}, "width"),
    ({"width": 100_000, "height": 8}, "width"),
    ({"width": 2048, "height": 2048}, "width"),
    ({"width": 65}, "width"),
    ({"width": "abc"}, "width"),
    ({"height": 64.5}, "height"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -3}, "num_inference_steps"),
    ({"num_inference_steps": 10**6}, "num_inference_steps"),
    ({"num_inference_steps": [1]}, "num_inference_steps"),
    ({"num_outputs": 0}, "num_outputs"),
    ({"num_outputs": 10**12}, "num_outputs"),
    ({"num_outputs": 8, "width": 1024, "height": 1024}, "num_outputs"),  # the pixel budget
    ({"seed": -5}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "abc"}, "seed"),
    ({"scheduler": "Euler z"}, "scheduler"),
    ({"scheduler": 5}, "scheduler"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_quality": 0}, "output_quality"),
    ({"model": "no-such-model"}, "model"),
    ({"model": "../../etc/passwd"}, "model"),
    ({"model": "x" * 500}, "model"),
    ({"image": ""}, "image"),
    ({"image": "!!! not base64 !!!"}, "image"),
    ({"image": "aGVsbG8gd29ybGQ="}, "image"),  # base64 of text, not an image
    ({"image": "data:image/png;base64,"}, "image"),
    ({"image": TRUNCATED}, "image"),
    ({"image": BOMB_HEADER}, "image"),
    ({"image": BOMB_REAL}, "image"),
    ({"image": "file:///etc/passwd"}, "image"),
    ({"image": "https://169.254.169.254/latest/meta-data/"}, "image"),
    ({"image": 12345}, "image"),
    ({"image": IMAGE, "mask": MASK_32}, "mask"),
    ({"mask": IMAGE}, "mask"),
    ({"loras": "tiny-style"}, "loras"),
    ({"loras": [{"source": "tiny-style", "extra": 1}]}, "loras"),
    ({"loras": [{"source": "tiny-style", "scale": NAN}]}, "loras"),
    ({"loras": [{"source": "no-such-lora"}]}, "loras"),
    ({"loras": [{"source": "../../etc/passwd"}]}, "loras"),
    ({"loras": [{"source": "file:///etc/passwd"}]}, "loras"),
    ({"loras": [{"source": "https://169.254.169.254/x.safetensors"}]}, "loras"),
    ({"prompt": "a fox <lora:no-such-lora:0.5>"}, "loras"),
    ({"prompt": "a fox <lora::>"}, "prompt"),
    ({"prompt": "a fox <lora:tiny-style:lots>"}, "prompt"),
    ({"steps_typo": 20}, "steps_typo"),
    ({"disable_safety_checker": "maybe"}, "disable_safety_checker"),
    (["not", "an", "object"], "input"),
    ("a string", "input"),
]

# A1111 payloads (RunPod): the error names A1111's own key.
A1111 = [
    ({"prompt": "x", "steps": -1}, "steps"),
    ({"prompt": "x", "steps": 2, "cfg_scale": "high"}, "cfg_scale"),
    ({"prompt": "x", "steps": 2, "cfg_scale": NAN}, "cfg_scale"),
    ({"prompt": "x", "steps": 2, "batch_size": 100}, "batch_size"),
    ({"prompt": "x", "steps": 2, "n_iter": 0}, "n_iter"),
    ({"prompt": "x", "steps": 2, "batch_size": True}, "batch_size"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler_name"),
    ({"prompt": "x", "steps": 2, "scheduler": "Exponential"}, "scheduler"),
    ({"prompt": "x", "steps": 2, "width": 8, "height": 100_000}, "width"),
    ({"steps": 2, "init_images": ["garbage!!"]}, "init_images"),
    ({"steps": 2, "init_images": "not-a-list"}, "init_images"),
    ({"steps": 2, "init_images": [IMAGE, IMAGE]}, "init_images"),
    ({"steps": 2, "init_images": [IMAGE], "denoising_strength": 2}, "denoising_strength"),
    ({"steps": 2, "init_images": [IMAGE], "mask": MASK_32}, "mask"),
    ({"prompt": "x", "steps": 2, "enable_hr": "yes"}, "enable_hr"),
    ({"prompt": "x", "steps": 2, "enable_hr": True, "hr_upscaler": "Nope"}, "hr_upscaler"),
    ({"prompt": "x", "steps": 2, "enable_hr": True, "subseed_strength": 0.5}, "enable_hr"),
    ({"prompt": "x", "steps": 2, "styles": ["cinematic"]}, "styles"),
    ({"prompt": "x", "steps": 2, "override_settings": {"sd_model_checkpoint": "nope.safetensors [abc123]"}},
     "sd_model_checkpoint"),
    ({"prompt": "x", "steps": 2, "override_settings": "tiny-sd15"}, "override_settings"),
    ({"prompt": "x", "steps": 2, "seed": "abc"}, "seed"),
    ({"prompt": "x", "steps": 2, "alwayson_scripts": {"controlnet": {"args": [True]}}}, "alwayson_scripts"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/extras"}, "payload": {}}, "api.endpoint"),
    ({"api": {"method": "GET", "endpoint": "/sdapi/v1/txt2img"}, "payload": {}}, "api.method"),
    ({"api": "txt2img", "prompt": "x", "steps": 2, "hr_scale": 2, "frobnicate": 1}, "frobnicate"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": "x"}, "payload"),
]


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------
import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sd_core import a1111  # noqa: E402
from sd_core.errors import InvalidRequest, SDError  # noqa: E402
from sd_core.schema import GenerationRequest, parse_request  # noqa: E402

FIELDS = sorted(GenerationRequest.model_fields)
A1111_KEYS = sorted(a1111.KNOWN_KEYS["txt2img"] | a1111.KNOWN_KEYS["img2img"])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "Euler a", "DPM++ 2M Karras", "png", "tiny-sd15", "NaN", "-1", "1e309", IMAGE[:40],
                     "data:image/png;base64,", "<lora:tiny-style:0.5>", "file:///etc/passwd"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
native_inputs = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), values, max_size=4),
    values,
)
a1111_inputs = st.one_of(
    st.dictionaries(st.sampled_from(A1111_KEYS), values, min_size=1, max_size=6),
    st.fixed_dictionaries({"api": st.one_of(st.sampled_from(["txt2img", "img2img", "extras"]), values)},
                          optional={"prompt": values, "steps": values, "init_images": values}),
    st.fixed_dictionaries({"api": st.fixed_dictionaries({"method": st.sampled_from(["POST", "GET", 1]),
                                                         "endpoint": values}),
                           "payload": values}),
)


def assert_clear(error: SDError, known_fields) -> None:
    """A message users can act on: ``field: reason`` with a field we know, no traceback, no pydantic URL."""
    message = str(error)
    assert message and "Traceback" not in message and "errors.pydantic.dev" not in message, message
    assert any(message.startswith((f"{field}:", f"{field}.", f"{field} ")) for field in known_fields), message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(native_inputs)
def test_fuzzed_native_inputs_are_parsed_or_refused_clearly(reliability_tally, data):
    reliability_tally["bad-input cases run (hypothesis, in process)"] += 1
    try:
        request = parse_request(data)
    except InvalidRequest as exc:
        named = {str(k) or "''" for k in data} if isinstance(data, dict) else set()
        assert_clear(exc, {*FIELDS, "input", "width x height", "mask", *named})
        return
    for name in ("guidance_scale", "strength"):
        value = getattr(request, name)
        assert value is None or math.isfinite(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a1111_inputs)
def test_fuzzed_a1111_payloads_are_translated_or_refused_clearly(reliability_tally, data):
    reliability_tally["bad-input cases run (hypothesis, in process)"] += 1
    known = {*A1111_KEYS, *a1111.FIELD_NAMES.values(), "input", "api", "api.method", "api.endpoint", "payload",
             "override_settings.sd_model_checkpoint", "batch_size x n_iter", "width x height", "mask",
             *(data.get("payload", {}) if isinstance(data.get("payload"), dict) else {}), *data}
    try:
        call = a1111.parse_call(data)
        if call is not None:
            a1111.to_request(call)
        else:
            parse_request(data)
    except InvalidRequest as exc:
        assert_clear(exc, known | {str(k) for k in known})


@pytest.fixture(scope="module")
def small_engine(engine_settings):
    import dataclasses

    from sd_core.engine import Engine

    return Engine(dataclasses.replace(engine_settings, max_batch_images=1))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(image=st.one_of(st.text(max_size=60), st.binary(max_size=200).map(b64),
                       st.sampled_from([IMAGE, TRUNCATED, BOMB_HEADER, "data:image/png;base64," + IMAGE])),
       mask=st.one_of(st.none(), st.sampled_from([IMAGE, MASK_32, TRUNCATED, "", "x"])),
       strength=st.floats(min_value=0.01, max_value=1.0),
       width=st.one_of(st.none(), st.sampled_from([64, 72, 2048])),
       prompt=st.text(max_size=80))
def test_fuzzed_images_and_prompts_fail_in_preparation_with_the_field(small_engine, reliability_tally, image, mask,
                                                                       strength, width, prompt):
    reliability_tally["bad-input cases run (hypothesis, in process)"] += 1
    try:
        request = parse_request({"prompt": prompt, "image": image, "mask": mask, "strength": strength,
                                 "width": width, "height": width})
        small_engine.prepare(request)  # decodes images, checks sizes and LoRA tags: no denoising
    except InvalidRequest as exc:
        assert_clear(exc, {"image", "mask", "prompt", "loras", "width", "height", "num_outputs", "strength"})


@pytest.mark.parametrize(("payload", "field"), NATIVE, ids=[f"{i}-{f}" for i, (_, f) in enumerate(NATIVE)])
def test_hand_written_corpus_through_the_engine(small_engine, reliability_tally, payload, field):
    reliability_tally["bad-input cases run (hand-written, engine)"] += 1
    with pytest.raises(InvalidRequest) as info:
        small_engine.generate(parse_request(payload))
    assert field in str(info.value), str(info.value)
    assert_clear(info.value, {field, "width x height", *(payload if isinstance(payload, dict) else ()),
                              *GenerationRequest.model_fields, "input"})


@pytest.mark.parametrize(("payload", "field"), A1111, ids=[f"{i}-{f}" for i, (_, f) in enumerate(A1111)])
def test_hand_written_a1111_corpus_through_the_engine(small_engine, reliability_tally, payload, field):
    reliability_tally["bad-input cases run (hand-written, engine)"] += 1
    with pytest.raises(InvalidRequest) as info:
        call = a1111.parse_call(payload)
        small_engine.generate(a1111.to_request(call))
    assert field in a1111.rename_fields(str(info.value)), str(info.value)


def test_engine_answers_a_normal_request_after_the_corpus(small_engine):
    result = small_engine.generate(GenerationRequest(prompt="a red fox", seed=4, num_inference_steps=2,
                                                     image=IMAGE, strength=0.5))
    assert result.images[0].width == 64
