"""User text: bounded before it is parsed, never echoed whole, never with a URL's credentials or query string —
through sd_core and through the RunPod worker's local API."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest

from sd_core import a1111
from sd_core.errors import InvalidRequest, quote, scrub
from sd_core.lora import LoraManager
from sd_core.manifests import ModelCatalog
from sd_core.prompt_tags import parse_prompt_tags
from sd_core.schema import MAX_LORAS, MAX_PROMPT_CHARS, GenerationRequest, parse_request
from sd_core.settings import REPO_ROOT, Settings
from tests.fixtures.runpod_server import start_runpod_server

MB = 1_000_000
SIGNATURE = "X-Amz-Signature=5ec2e7f00d"
PASSWORD = "hunter2pw"
SIGNED_TAG = f"<lora:https://127.0.0.1/x.safetensors?{SIGNATURE}:0.5>"
PASSWORD_TAG = f"<lora:https://user:{PASSWORD}@example.com/x.safetensors:0.5>"
FREEZER = "x" + " " * 60_000 + "x"  # quadratic for a backtracking `\s*...$` search


def a1111_error(data: dict) -> str:
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(a1111.parse_call(data))
    return str(caught.value)


def native_error(data: dict) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(data)
    return str(caught.value)


# --- bounded before parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [FREEZER, "y" * MB])
def test_long_checkpoint_name_is_refused_by_length_naming_the_key_and_limit(value):
    started = time.perf_counter()
    message = a1111_error({"steps": 2, "override_settings": {"sd_model_checkpoint": value}})
    assert message == (f"override_settings.sd_model_checkpoint: longer than {a1111.MAX_CHECKPOINT_CHARS} characters "
                       f"(got {len(value)})")
    assert time.perf_counter() - started < 1  # generous: the old regex took seconds on FREEZER alone


@pytest.mark.parametrize(("value", "model"), [
    ("tiny-sdxl.safetensors [0123abcd]", "tiny-sdxl"), ("tiny-sdxl  [0123abcd]", "tiny-sdxl"),
    ("tiny-sdxl.CKPT", "tiny-sdxl"), ("tiny-sdxl", "tiny-sdxl"), ("tiny-sdxl [not hex]", "tiny-sdxl [not hex]"),
    ("tiny-sdxl.safetensors []", "tiny-sdxl.safetensors []"), ("x" + " " * 150 + "x", "x" + " " * 150 + "x"),
])
def test_checkpoint_names_are_still_read_as_a1111_writes_them(value, model):
    request = a1111.to_request(a1111.parse_call({"steps": 2, "override_settings": {"sd_model_checkpoint": value}}))
    assert request.model == model


def test_pathological_lora_tag_prompts_are_parsed_in_one_pass():
    for prompt in ("<lora:" * (MAX_PROMPT_CHARS // 6), "<lora:x" + ":" * (MAX_PROMPT_CHARS - 7),
                   "<lora:<lora:>" * (MAX_PROMPT_CHARS // 13), "<lora:https://" + ":" * (MAX_PROMPT_CHARS - 15) + ">"):
        assert len(prompt) <= MAX_PROMPT_CHARS
        started = time.perf_counter()
        try:
            parse_prompt_tags(prompt)
        except InvalidRequest as exc:
            assert len(str(exc)) < 300
        assert time.perf_counter() - started < 1


def test_lora_tags_beyond_the_limit_and_overlong_prompts_are_refused_unparsed():
    with pytest.raises(InvalidRequest, match=f"^prompt: more than {MAX_LORAS} LoRA tags"):
        parse_prompt_tags("<lora:a>" * 1000)
    with pytest.raises(InvalidRequest, match=f"^prompt: longer than {MAX_PROMPT_CHARS} characters$"):
        parse_prompt_tags("<lora:" * MB)


# --- no unbounded echo ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "field"), [
    ({"steps": 2, "sampler_name": "s" * MB}, "sampler_name: "),
    ({"steps": 2, "sampler_name": "Euler", "scheduler": "k" * 35_000}, "scheduler: "),
    ({"steps": 2, "sampler_name": "e" * MB, "scheduler": "Karras"}, "sampler_name: "),
    ({"steps": 2, "override_settings": {"sd_model_checkpoint": "m" * 250}}, "override_settings.sd_model_checkpoint: "),
    ({"steps": 2, "batch_size": "b" * MB}, "batch_size: "),
    ({"api": "a" * MB}, "api: "),
    ({"api": {"method": "g" * MB, "endpoint": "txt2img"}}, "api.method: "),
    ({"steps": 2, **{"k" * 1000 + str(i): 1 for i in range(100)}}, "'kkkk"),
    ({"api": {"endpoint": "txt2img"}, "payload": {}, **{"k" * 1000 + str(i): 1 for i in range(100)}}, "input: "),
])
def test_a1111_errors_quote_user_values_shortened(data, field):
    message = a1111_error(data)
    assert message.startswith(field) or field in message
    assert len(message) < 1000 and not re.search(r"(.)\1{99}", message), message[:1000]


@pytest.mark.parametrize(("data", "field"), [
    ({"scheduler": "s" * MB}, "scheduler: "),
    ({"model": "m" * MB}, "model: "),
    ({**{"k" * MB: 1}}, "'kkkk"),
    ({"loras": [{"source": "l" * MB}]}, "loras.0.source: "),
])
def test_native_errors_are_short(data, field):
    message = native_error(data)
    assert message.startswith(field) and len(message) < 300, message


def test_many_native_errors_are_counted_not_listed():
    message = native_error({f"bogus{i}": 1 for i in range(1000)})
    assert message.endswith("and 990 more errors") and len(message) < 400


def test_unknown_model_and_scheduler_names_are_quoted_shortened():
    with pytest.raises(InvalidRequest) as caught:
        ModelCatalog({}).get("m" * MB)
    assert str(caught.value) == f"model: unknown model {quote('m' * MB)}; available: none"
    assert len(native_error({"scheduler": "DPM++ 2M Karras" * 5})) < 300


# --- no secrets ----------------------------------------------------------------------------------------------------
def test_scrub_removes_secrets_of_long_urls():
    long_path = "https://host/" + "p" * 5000 + "?" + SIGNATURE
    long_user = "https://" + "u" * 1000 + f":{PASSWORD}@host/x"
    for text in (long_path, long_user, f"see {long_path} and {long_user}."):
        cleaned = scrub(text)
        assert SIGNATURE not in cleaned and PASSWORD not in cleaned


def test_url_lora_tags_are_urls_and_their_secrets_stay_out_of_errors_and_logs(caplog):
    _, specs = parse_prompt_tags(f"a fox {SIGNED_TAG} {PASSWORD_TAG}")
    assert [(s.source.split("?")[0], s.scale) for s in specs] == [
        ("https://127.0.0.1/x.safetensors", 0.5), (f"https://user:{PASSWORD}@example.com/x.safetensors", 0.5)]
    catalog = ModelCatalog.from_dir(REPO_ROOT / "models")
    manager = LoraManager(Settings(), catalog)
    manifest = next(iter(catalog.manifests.values()))
    caplog.set_level(logging.DEBUG)
    for tag, reason in ((SIGNED_TAG, "loopback"), (PASSWORD_TAG, "credentials")):
        with pytest.raises(InvalidRequest) as caught:
            manager.prepare(GenerationRequest(prompt=f"a fox {tag}"), manifest)
        assert str(caught.value).startswith("loras: ") and reason in str(caught.value)
        # A tag that does not parse is quoted in the error: without its secrets either.
        with pytest.raises(InvalidRequest) as bad:
            parse_prompt_tags(tag.replace(":0.5>", ":99>"))
        for text in (str(caught.value), str(bad.value), caplog.text):
            assert SIGNATURE not in text and PASSWORD not in text


# --- the RunPod worker ---------------------------------------------------------------------------------------------
def test_runpod_handler_parses_input_off_the_event_loop(monkeypatch):
    import handler

    threads = []

    def to_request(call):
        threads.append(threading.current_thread())
        raise InvalidRequest("stop here", field="steps")

    monkeypatch.setattr(handler.a1111, "to_request", to_request)
    worker = object.__new__(handler.Worker)
    worker.broken = None

    async def run():
        return await worker.handler({"id": "j", "input": {"steps": 2}}), threading.current_thread()

    output, loop_thread = asyncio.run(run())
    assert output == {"error": "steps: stop here"}
    assert threads and threads[0] is not loop_thread


@pytest.fixture(scope="module")
def server(runpod_weights_env, tmp_path_factory):
    with start_runpod_server(runpod_weights_env, log_dir=tmp_path_factory.mktemp("runpod-text")) as server:
        yield server


@pytest.mark.parametrize(("job_input", "expected"), [
    ({"steps": 2, "override_settings": {"sd_model_checkpoint": "c" * MB}},
     f"override_settings.sd_model_checkpoint: longer than {a1111.MAX_CHECKPOINT_CHARS} characters"),
    ({"steps": 2, "override_settings": {"sd_model_checkpoint": FREEZER}},
     f"override_settings.sd_model_checkpoint: longer than {a1111.MAX_CHECKPOINT_CHARS} characters"),
    ({"prompt": "x", "steps": 2, "sampler_name": "s" * MB}, "sampler_name: unknown scheduler"),
    ({"prompt": "x", "steps": 2, "sampler_name": "Euler", "scheduler": "k" * 35_000}, "scheduler: 'kkk"),
    ({"prompt": "x", "num_inference_steps": 2, "model": "m" * MB}, "model: "),
    ({"prompt": f"a fox {SIGNED_TAG}", "num_inference_steps": 2, "width": 64, "height": 64}, "loras: "),
    ({"prompt": f"a fox {PASSWORD_TAG}", "steps": 2, "width": 64, "height": 64}, "loras: "),
    ({"prompt": f"a fox {SIGNED_TAG[:-5]}:99>", "num_inference_steps": 2}, "prompt: "),
])
def test_runpod_errors_are_short_and_hold_no_secrets(server, job_input, expected):
    started = time.perf_counter()
    job = server.runsync(job_input, timeout=60)
    assert job["status"] == "FAILED", job
    assert job["error"].startswith(expected) and len(job["error"]) < 300, job["error"][:1000]
    assert time.perf_counter() - started < 30
    for text in (job["error"], server.log_text()):
        assert SIGNATURE not in text and PASSWORD not in text
