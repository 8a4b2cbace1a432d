"""GenerationRequest validation: every bad value is refused with the field and the limit named."""

import pytest

from sd_core.errors import InvalidRequest
from sd_core.schedulers import SCHEDULER_NAMES
from sd_core.schema import GenerationRequest, parse_request, resolve_seed

BAD_INPUTS = [
    ({"width": 65}, "width", "multiple of 8"),
    ({"width": 4096}, "width", "2048"),
    ({"height": 32}, "height", "64"),
    ({"width": 2048, "height": 2048}, "width x height", "2359296"),
    ({"num_inference_steps": 0}, "num_inference_steps", "1"),
    ({"num_inference_steps": 151}, "num_inference_steps", "150"),
    ({"guidance_scale": -1}, "guidance_scale", "0"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite"),
    ({"guidance_scale": float("inf")}, "guidance_scale", "finite"),
    ({"seed": -2}, "seed", "-1"),
    ({"seed": 2**32}, "seed", "4294967295"),
    ({"seed": "abc"}, "seed", "integer"),
    ({"subseed": -2}, "subseed", "-1"),
    ({"subseed": 2**32}, "subseed", "4294967295"),
    ({"subseed_strength": -0.1}, "subseed_strength", "0"),
    ({"subseed_strength": 1.01}, "subseed_strength", "1"),
    ({"subseed_strength": float("nan")}, "subseed_strength", "finite"),
    ({"subseed_strength": 0.5, "image": "aGVsbG8="}, "subseed_strength", "txt2img only"),
    ({"num_outputs": 0}, "num_outputs", "1"),
    ({"num_outputs": 9}, "num_outputs", "8"),
    ({"scheduler": "Euler b"}, "scheduler", "DPM++ 2M Karras"),
    ({"strength": 0}, "strength", "0"),
    ({"strength": 1.5}, "strength", "1"),
    ({"output_format": "gif"}, "output_format", "png"),
    ({"output_quality": 101}, "output_quality", "100"),
    ({"prompt": "x" * 10_001}, "prompt", "10000"),
    ({"prompt": 5}, "prompt", "string"),
    ({"steps": 20}, "steps", "unknown field"),
    ({"mask": "aGVsbG8="}, "mask", "image"),
    ({"loras": [{"source": "x", "scale": 9}]}, "loras.0.scale", "5"),
    ({"loras": [{"source": ""}]}, "loras.0.source", "1 character"),
    ({"loras": [{"source": "a"}] * 9}, "loras", "8"),
]


@pytest.mark.parametrize(("data", "field", "limit"), BAD_INPUTS, ids=[str(d)[:40] for d, _, _ in BAD_INPUTS])
def test_bad_values_name_field_and_limit(data, field, limit):
    with pytest.raises(InvalidRequest) as info:
        parse_request(data)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert limit in message, message
    assert "Traceback" not in message and "pydantic" not in message


def test_not_an_object_is_refused():
    with pytest.raises(InvalidRequest, match="input: expected a JSON object"):
        parse_request(["prompt"])


def test_defaults_mean_model_defaults():
    request = parse_request({"prompt": "a cat"})
    assert (request.width, request.height, request.num_inference_steps, request.scheduler) == (None,) * 4
    assert request.num_outputs == 1 and request.output_format == "png" and request.mode == "txt2img"


def test_scheduler_aliases_are_canonicalised():
    assert parse_request({"scheduler": "euler a"}).scheduler == "Euler a"
    assert parse_request({"scheduler": "k_dpmpp_2m_karras"}).scheduler == "DPM++ 2M Karras"
    assert set(GenerationRequest.model_json_schema()["properties"]["scheduler"]["anyOf"][0]["enum"]) == set(
        SCHEDULER_NAMES
    )


A1111_SAMPLERS = ["Euler a", "Euler", "LMS", "Heun", "DPM++ SDE", "DDIM", "PLMS", "UniPC", "LCM", "LMS Karras",
                  "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential",
                  "DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun Exponential"]


@pytest.mark.parametrize("name", A1111_SAMPLERS)
def test_a1111_sampler_names_are_accepted(name):
    assert parse_request({"scheduler": name}).scheduler == name
    assert parse_request({"scheduler": name.upper()}).scheduler == name


@pytest.mark.parametrize(("name", "reason"), [
    ("DPM++ 2S", "unknown scheduler 'DPM++ 2S'"),  # invented names: A1111 has only "DPM++ 2S a"
    ("DPM++ 2S Karras", "unknown scheduler 'DPM++ 2S Karras'"),
    ("DEIS", "unknown scheduler 'DEIS'"),
    ("DPM++ 2S a", "'DPM++ 2S a' is an A1111 sampler with no faithful diffusers equivalent"),
    ("DPM++ 3M SDE Karras", "'DPM++ 3M SDE Karras' is an A1111 sampler with no faithful diffusers equivalent"),
    ("DPM fast", "no faithful diffusers equivalent"),
    ("Restart", "no faithful diffusers equivalent"),
    ("DDIM CFG++", "no faithful diffusers equivalent"),
    ("Euler a Karras", "sampler 'Euler a' with schedule 'Karras' is not supported"),
    ("DPM++ 2M Polyexponential", "sampler 'DPM++ 2M' with schedule 'Polyexponential' is not supported"),
    # no diffusers path gives A1111's sigmas for these (tests/sd_core/test_a1111_sigmas.py)
    ("DPM2", "'DPM2' is an A1111 sampler with no faithful diffusers equivalent"),
    ("DPM2 a Karras", "'DPM2 a Karras' is an A1111 sampler with no faithful diffusers equivalent"),
    ("DPM++ 2M", "schedule 'Uniform' is not supported; 'DPM++ 2M' takes Karras, Exponential, Beta (or Automatic = "
                 "Karras); diffusers cannot run that pair with A1111's sigmas"),
    ("DPM++ 2M SDE SGM Uniform", "sampler 'DPM++ 2M SDE' with schedule 'SGM Uniform' is not supported"),
    ("Euler a SGM Uniform", "sampler 'Euler a' with schedule 'SGM Uniform' is not supported"),
])
def test_other_sampler_names_are_refused_with_the_valid_ones(name, reason):
    with pytest.raises(InvalidRequest) as info:
        parse_request({"scheduler": name})
    message = str(info.value)
    assert message.startswith("scheduler: ") and reason in message, message
    if "unknown" in reason or "equivalent" in reason:
        assert "valid: Euler, " in message and "DPM++ 2M SDE Heun Exponential" in message


def test_unknown_huge_sampler_name_gives_a_short_error():
    with pytest.raises(InvalidRequest) as info:
        parse_request({"scheduler": "x" * 1_000_000})
    message = str(info.value)
    assert message.startswith("scheduler: unknown scheduler 'xxx") and "x" * 81 not in message
    assert len(message) < 1000


def test_modes_follow_images():
    assert parse_request({"image": "aGk="}).mode == "img2img"
    assert parse_request({"image": "aGk=", "mask": "aGk="}).mode == "inpaint"


def test_seed_resolution():
    assert resolve_seed(7) == 7
    random_seeds = {resolve_seed(None) for _ in range(5)} | {resolve_seed(-1) for _ in range(5)}
    assert len(random_seeds) > 1 and all(0 <= s < 2**32 for s in random_seeds)
