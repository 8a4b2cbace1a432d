"""The Cog adapter on the real Cog prediction server (coglet), driven over HTTP the way Replicate drives it.

One server for the module (tiny model, CPU, COG_MAX_CONCURRENCY=2); failing setups start their own.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.cog_server import start_cog_server

REPO = Path(__file__).resolve().parents[2]
FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def weights_bucket(tiny_bucket, s3_server) -> str:
    """The tiny models (and LoRAs) uploaded to a fresh bucket on the local S3 server."""
    bucket = s3_server.make_bucket("cog")
    client = s3_server.client()
    for path in sorted(p for p in tiny_bucket.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, path.relative_to(tiny_bucket).as_posix())
    return bucket


@pytest.fixture(scope="module")
def weights_env(weights_bucket, s3_server, tmp_path_factory) -> dict[str, str]:
    """What the Cog worker needs to fetch its models from S3 at cold start, and an empty cache of its own."""
    return {
        **s3_server.env,
        "SD_MODELS_DIR": str(REPO / "models"),
        "SD_WEIGHTS_URI": f"s3://{weights_bucket}",
        "SD_CACHE_DIR": str(tmp_path_factory.mktemp("cog-weights-cache")),
    }


@pytest.fixture(scope="module")
def cog_server(weights_env, tmp_path_factory):
    env = {**weights_env, "COG_MAX_CONCURRENCY": "2"}
    with start_cog_server(env, log_dir=tmp_path_factory.mktemp("cog-server")) as server:
        body, seen = server.wait_for_status("READY", "SETUP_FAILED", timeout=240)
        assert body["status"] == "READY", body
        server.statuses_seen = seen
        yield server


def decode_output(uri: str) -> tuple[str, Image.Image]:
    """A `data:<mime>;base64,...` output -> (mime type, decoded image)."""
    header, payload = uri.split(",", 1)
    mime = header.removeprefix("data:").split(";")[0]
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return mime, image


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def reported_seed(prediction: dict) -> int:
    match = re.search(r"Using seed: (\d+)", prediction["logs"])
    assert match, prediction["logs"]
    return int(match.group(1))


# --- lifecycle ---------------------------------------------------------------------------------------------------
def test_health_check_goes_from_starting_to_ready(cog_server, weights_bucket):
    assert cog_server.statuses_seen[0] == "STARTING"
    assert cog_server.statuses_seen[-1] == "READY"
    setup = cog_server.health()["setup"]
    assert setup["status"] == "succeeded"
    # The cold start logged its progress: the preload, and the fetch from the local S3 server.
    assert "preloading tiny-sd15" in setup["logs"]
    assert f"s3://{weights_bucket}/tiny-sd15/" in setup["logs"]


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"SD_DEFAULT_MODEL": "missing"}, "unknown model 'missing'"),
        ({"SD_WEIGHTS_URI": "s3://no-such-bucket-for-cog"}, "s3://no-such-bucket-for-cog/tiny-sd15/diffusers/"),
    ],
    ids=["unknown-model", "weights-nowhere"],
)
def test_failing_setup_shows_setup_failed_with_a_readable_reason(cog_server_factory, weights_env, broken, reason):
    server = cog_server_factory({**weights_env, **broken})
    body, seen = server.wait_for_status("SETUP_FAILED", "READY", timeout=240)
    assert body["status"] == "SETUP_FAILED", body
    assert body["setup"]["status"] == "failed"
    assert reason in body["setup"]["logs"]
    assert "Traceback" not in body["setup"]["logs"]


# --- synchronous predictions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_prediction_returns_files_of_the_requested_size_count_and_format(cog_server, fmt, pil_format):
    prediction = cog_server.predict(
        {**FAST, "width": 64, "height": 80, "num_outputs": 2, "output_format": fmt, "seed": 1234}
    )
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert len(prediction["output"]) == 2
    for uri in prediction["output"]:
        mime, image = decode_output(uri)
        assert mime == f"image/{fmt}"
        assert image.format == pil_format
        assert image.size == (64, 80)
    assert reported_seed(prediction) == 1234
    assert prediction["metrics"]["seed"] == 1234


def test_random_seed_is_reported_and_reproduces_the_image(cog_server):
    first = cog_server.predict(FAST)
    assert first["status"] == "succeeded", first.get("error")
    seed = reported_seed(first)
    assert first["metrics"]["seed"] == seed
    again = cog_server.predict({**FAST, "seed": seed})
    assert again["status"] == "succeeded", again.get("error")
    assert decode_output(again["output"][0])[1].tobytes() == decode_output(first["output"][0])[1].tobytes()
    other = cog_server.predict({**FAST, "seed": (seed + 1) % 2**32})
    assert decode_output(other["output"][0])[1].tobytes() != decode_output(first["output"][0])[1].tobytes()


def test_img2img_and_inpaint_take_cog_file_inputs(cog_server):
    init = Image.new("RGB", (72, 64), (200, 40, 40))
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (0, 0, 36, 64))
    for extra in ({"image": data_uri(init)}, {"image": data_uri(init), "mask": data_uri(mask)}):
        prediction = cog_server.predict({**FAST, "num_inference_steps": 4, "strength": 0.5, **extra})
        assert prediction["status"] == "succeeded", prediction.get("error")
        assert decode_output(prediction["output"][0])[1].size == (72, 64)


# --- invalid input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"num_inference_steps": 999}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"width": 4096}, "width"),
        ({"height": 32}, "height"),
        ({"num_outputs": 9}, "num_outputs"),
        ({"scheduler": "Euler Turbo"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"num_outputs": "many"}, "num_outputs"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"disable_safety_checker": "maybe"}, "disable_safety_checker"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_invalid_input_is_rejected_with_422_naming_the_field(cog_server, inputs, field):
    response = cog_server.post_prediction({"input": {**FAST, **inputs}})
    assert response.status_code == 422, response.text
    assert ["body", "input", field] in [item["loc"] for item in response.json()["detail"]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"width": 100}, "width: must be a multiple of 8 (got 100)"),
        ({"model": "no-such-model"}, "model: unknown model 'no-such-model'"),
        ({"mask": data_uri(Image.new("L", (64, 64), 255))}, "mask: needs an image too"),
        ({"image": data_uri(Image.new("RGB", (64, 64))), "strength": 0}, "strength:"),
        ({"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, "image: not a readable"),
    ],
    ids=["width-not-multiple-of-8", "unknown-model", "mask-without-image", "strength-zero", "image-garbage"],
)
def test_engine_rejection_fails_the_prediction_with_field_and_reason(cog_server, inputs, message):
    prediction = cog_server.predict({**FAST, **inputs})
    assert prediction["status"] == "failed"
    assert message in prediction["error"]
    assert "Traceback" not in prediction["error"]


# --- async, webhooks, concurrency, cancel -------------------------------------------------------------------------
def test_async_prediction_delivers_succeeded_by_webhook(cog_server, webhook_receiver):
    response = cog_server.start_async("cog-async-ok", {**FAST, "seed": 99}, webhook_receiver.url)
    assert response.status_code == 202, response.text
    final = webhook_receiver.wait_for_terminal("cog-async-ok")
    assert final["status"] == "succeeded", final.get("error")
    assert len(final["output"]) == 1
    assert decode_output(final["output"][0])[0] == "image/png"
    assert "Using seed: 99" in final["logs"]


def test_two_predictions_run_at_once_and_cancel_stops_the_engine(cog_server, webhook_receiver):
    slow = {**FAST, "num_inference_steps": 150}
    ids = ["cog-slow-a", "cog-slow-b"]
    for prediction_id in ids:
        response = cog_server.start_async(prediction_id, slow, webhook_receiver.url)
        assert response.status_code == 202, response.text  # two slots (COG_MAX_CONCURRENCY=2): both accepted
    third = cog_server.start_async("cog-slow-c", slow, webhook_receiver.url)
    assert third.status_code == 409, third.text  # ...and a third is refused while both run
    # Cancel once the first is really denoising (its progress lines reached the logs).
    webhook_receiver.wait_for(ids[0], lambda body: "%|" in (body.get("logs") or ""), timeout=120)
    for prediction_id in ids:
        assert cog_server.cancel(prediction_id).status_code == 200
    for prediction_id in ids:
        assert webhook_receiver.wait_for_terminal(prediction_id)["status"] == "canceled"
    # The engine stopped between steps (the adapter logs where), well before the 150th.
    deadline, stopped = time.monotonic() + 60, []
    while len(stopped) < 2 and time.monotonic() < deadline:
        stopped = [m for m in cog_server.user_log_messages() if "generation stopped after step" in m]
        time.sleep(0.2)
    assert len(stopped) == 2, cog_server.log_text()[-3000:]
    for message in stopped:
        done, total = map(int, re.search(r"step (\d+) of (\d+)", message).groups())
        assert done < 150 and total in (0, 150)
    after = cog_server.predict(FAST)  # the slots are free again and the worker is healthy
    assert after["status"] == "succeeded", after.get("error")
    assert cog_server.health()["status"] == "READY"


# --- schema ------------------------------------------------------------------------------------------------------
def test_openapi_json_shows_the_inputs_with_their_bounds(cog_server):
    response = cog_server.openapi()
    assert response.status_code == 200
    schemas = response.json()["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (1, 150)
    assert (props["width"]["minimum"], props["width"]["maximum"]) == (64, 2048)
    assert (props["num_outputs"]["minimum"], props["num_outputs"]["maximum"], props["num_outputs"]["default"]) == (
        1, 8, 1,
    )
    assert (props["lora_scale"]["minimum"], props["lora_scale"]["maximum"]) == (-5, 5)
    assert "Euler a" in schemas["scheduler"]["enum"]
    assert schemas["output_format"]["enum"] == ["png", "webp", "jpeg"]
    assert props["image"]["format"] == "uri"
    assert schemas["Output"]["type"] == "array"
    committed = json.loads((REPO / ".cog" / "openapi_schema.json").read_text())
    assert schemas["Input"] == committed["components"]["schemas"]["Input"]  # the server serves the committed schema


# --- LoRA --------------------------------------------------------------------------------------------------------
def test_lora_weights_change_the_image(cog_server):
    base = cog_server.predict({**FAST, "seed": 7})
    styled = cog_server.predict({**FAST, "seed": 7, "lora_weights": "tiny-style", "lora_scale": 1.0})
    assert base["status"] == "succeeded" and styled["status"] == "succeeded", styled.get("error")
    base_pixels = decode_output(base["output"][0])[1].tobytes()
    assert decode_output(styled["output"][0])[1].tobytes() != base_pixels
    again = cog_server.predict({**FAST, "seed": 7})  # without the LoRA: the base image again
    assert decode_output(again["output"][0])[1].tobytes() == base_pixels
    unknown = cog_server.predict({**FAST, "lora_weights": "no-such-lora"})
    assert unknown["status"] == "failed" and "no-such-lora" in unknown["error"]


def test_extra_lora_is_a_second_lora_applied_with_lora_weights(cog_server, engine):
    """Replicate's extra_lora/extra_lora_scale: the native request with both LoRAs in `loras`, pixel for pixel."""
    from sd_core.schema import GenerationRequest

    both = cog_server.predict({**FAST, "seed": 11, "lora_weights": "tiny-style", "lora_scale": 0.7,
                               "extra_lora": "tiny-style-kohya", "extra_lora_scale": -0.4})
    alone = cog_server.predict({**FAST, "seed": 11, "lora_weights": "tiny-style", "lora_scale": 0.7})
    only_extra = cog_server.predict({**FAST, "seed": 11, "extra_lora": "tiny-style-kohya", "extra_lora_scale": -0.4})
    for prediction in (both, alone, only_extra):
        assert prediction["status"] == "succeeded", prediction.get("error")
    native = engine.generate(GenerationRequest(**FAST, seed=11, loras=[
        {"source": "tiny-style", "scale": 0.7}, {"source": "tiny-style-kohya", "scale": -0.4}]))
    native_pixels = np.asarray(Image.open(io.BytesIO(native.images[0].data)).convert("RGB"))
    pixels = [np.asarray(decode_output(p["output"][0])[1].convert("RGB")) for p in (both, alone, only_extra)]
    assert np.array_equal(pixels[0], native_pixels)
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    native_extra = engine.generate(GenerationRequest(**FAST, seed=11, loras=[
        {"source": "tiny-style-kohya", "scale": -0.4}]))  # extra_lora alone is that one LoRA
    assert np.array_equal(pixels[2], np.asarray(Image.open(io.BytesIO(native_extra.images[0].data)).convert("RGB")))


# --- safety checker: on by default on Cog (the tiny checker flags nothing; more in tests/sd_core/test_safety.py)
def test_safety_checker_is_on_by_default_and_reported_as_a_metric(cog_server):
    prediction = cog_server.predict({**FAST, "num_outputs": 2, "seed": 8})
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert prediction["metrics"]["has_nsfw_concepts"] == [False, False]
    assert "safety checker tiny-safety-checker loaded" in cog_server.log_text()


# --- IP-Adapter: ip_adapter_image + ip_adapter_scale (more in tests/sd_core/test_ip_adapter.py) -----------------------
def test_ip_adapter_image_is_the_native_ip_adapters_entry(cog_server, engine):
    from sd_core.schema import GenerationRequest

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (240, 60, 20)).save(buffer, format="PNG")
    reference = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    adapted = cog_server.predict({**FAST, "seed": 13, "ip_adapter_image": reference, "ip_adapter_scale": 0.6})
    plain = cog_server.predict({**FAST, "seed": 13})
    for prediction in (adapted, plain):
        assert prediction["status"] == "succeeded", prediction.get("error")
    native = engine.generate(GenerationRequest(**FAST, seed=13, ip_adapters=[{"image": reference, "scale": 0.6}]))
    got = np.asarray(decode_output(adapted["output"][0])[1].convert("RGB"))
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(native.images[0].data)).convert("RGB")))
    assert not np.array_equal(got, np.asarray(decode_output(plain["output"][0])[1].convert("RGB")))
