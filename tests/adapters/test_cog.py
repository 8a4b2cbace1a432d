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


def test_inpainting_options_and_outpaint_inputs(cog_server):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = {**FAST, "num_inference_steps": 2, "image": data_uri(init), "mask": data_uri(mask), "mask_blur": 4,
               "invert_mask": True, "inpaint_fill": "fill", "padding_mask_crop": 8, "inpaint_overlay": True}
    prediction = cog_server.predict(inpaint)
    assert prediction["status"] == "succeeded", prediction.get("error")
    grown = cog_server.predict({**FAST, "num_inference_steps": 2, "image": data_uri(init), "outpaint_left": 16,
                                "outpaint_bottom": 8})
    assert grown["status"] == "succeeded", grown.get("error")
    assert decode_output(grown["output"][0])[1].size == (80, 72)
    refused = cog_server.predict({**FAST, "image": data_uri(init), "mask": data_uri(mask), "outpaint_top": 8})
    assert refused["status"] == "failed" and "outpaint: makes its own mask" in refused["error"]


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


def test_max_sequence_length_input_reaches_an_sd3_model(cog_server):
    sd3 = {**FAST, "model": "tiny-sd3", "seed": 3}
    default, short = cog_server.predict(sd3), cog_server.predict({**sd3, "max_sequence_length": 4})
    assert default["status"] == "succeeded" and short["status"] == "succeeded", short.get("error")
    assert decode_output(default["output"][0])[1].tobytes() != decode_output(short["output"][0])[1].tobytes()
    refused = cog_server.predict({**FAST, "max_sequence_length": 4})  # tiny-sd15
    assert refused["status"] == "failed" and (
        "max_sequence_length: 'tiny-sd15' is a sd15 model, which has no T5 text encoder") in refused["error"]


# --- VAE -------------------------------------------------------------------------------------------------------


def test_vae_input_swaps_the_vae_and_automatic_is_the_models_own(cog_server):
    base = cog_server.predict({**FAST, "seed": 7})
    swapped = cog_server.predict({**FAST, "seed": 7, "vae": "tiny-vae"})
    automatic = cog_server.predict({**FAST, "seed": 7, "vae": "Automatic"})
    assert all(p["status"] == "succeeded" for p in (base, swapped, automatic)), swapped.get("error")
    base_pixels = decode_output(base["output"][0])[1].tobytes()
    assert decode_output(swapped["output"][0])[1].tobytes() != base_pixels
    assert decode_output(automatic["output"][0])[1].tobytes() == base_pixels
    unknown = cog_server.predict({**FAST, "vae": "no-such-vae"})
    assert unknown["status"] == "failed" and "vae: unknown VAE 'no-such-vae' for tiny-sd15" in unknown["error"]


# --- hires fix ---------------------------------------------------------------------------------------------------


def test_hires_inputs_upscale_and_run_the_second_pass(cog_server):
    hires = {**FAST, "width": 64, "height": 64, "seed": 5, "hires_scale": 2, "hires_upscaler": "Lanczos",
             "hires_steps": 2, "hires_denoising_strength": 0.5}
    prediction = cog_server.predict(hires)
    assert prediction["status"] == "succeeded", prediction.get("error")
    image = decode_output(prediction["output"][0])[1]
    assert image.size == (128, 128)
    assert "Hires upscale: 2" in image.info["parameters"] and "Hires upscaler: Lanczos" in image.info["parameters"]
    assert "| 4/4" in prediction["logs"]  # progress over both passes: 2 + 2 steps
    assert prediction["metrics"]["has_nsfw_concepts"] == [False]  # the safety checker ran on the final image
    plain = cog_server.predict({**hires, "hires_scale": 0})  # 0: off, the other hires inputs unused
    assert decode_output(plain["output"][0])[1].size == (64, 64)
    unknown = cog_server.predict({**hires, "hires_upscaler": "4x-Nope"})
    assert unknown["status"] == "failed" and "hires.upscaler: unknown upscaler '4x-Nope'" in unknown["error"]


# --- textual-inversion embeddings -----------------------------------------------------------------------------------


def test_embedding_named_in_the_negative_prompt_changes_the_image(cog_server):
    base = cog_server.predict({**FAST, "seed": 7, "negative_prompt": "fog"})
    negated = cog_server.predict({**FAST, "seed": 7, "negative_prompt": "fog, tiny-neg"})
    assert base["status"] == "succeeded" and negated["status"] == "succeeded", negated.get("error")
    assert decode_output(negated["output"][0])[1].tobytes() != decode_output(base["output"][0])[1].tobytes()
    refused = cog_server.predict({**FAST, "negative_prompt": "neg", "embeddings": "neg=https://127.0.0.1/n.safetensors"})
    assert refused["status"] == "failed" and "embeddings.0.source: host '127.0.0.1'" in refused["error"]


# --- SDXL refiner (more in tests/sd_core/test_refiner.py) -----------------------------------------------------------


def test_refine_runs_the_sdxl_refiner(cog_server):
    sdxl = {**FAST, "model": "tiny-sdxl", "width": 64, "height": 64, "seed": 4}
    base = cog_server.predict(sdxl)
    refined = cog_server.predict({**sdxl, "refine": "base_image_refiner", "refine_steps": 4})
    assert base["status"] == "succeeded" and refined["status"] == "succeeded", refined.get("error")
    assert decode_output(refined["output"][0])[1].tobytes() != decode_output(base["output"][0])[1].tobytes()
    sd15 = cog_server.predict({**FAST, "refine": "expert_ensemble_refiner", "refiner": "tiny-sdxl-refiner"})
    assert sd15["status"] == "failed"
    assert "refiner: 'tiny-sdxl-refiner' refines sdxl models, not 'tiny-sd15' (sd15)" in sd15["error"]
# --- ControlNet ---------------------------------------------------------------------------------------------------
def test_control_image_and_model_steer_the_image(cog_server):
    import numpy as np

    control = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    control.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    base = cog_server.predict({**FAST, "seed": 7})
    steered = cog_server.predict({**FAST, "seed": 7, "control_image": uri, "control_model": "tiny-control-a",
                                  "control_scale": 1.5})
    off = cog_server.predict({**FAST, "seed": 7, "control_image": uri, "control_model": "tiny-control-a",
                              "control_scale": 0})
    for prediction in (base, steered, off):
        assert prediction["status"] == "succeeded", prediction.get("error")
    base_pixels = decode_output(base["output"][0])[1].tobytes()
    assert decode_output(steered["output"][0])[1].tobytes() != base_pixels
    assert decode_output(off["output"][0])[1].tobytes() == base_pixels  # scale 0: exactly the image without it
    alone = cog_server.predict({**FAST, "control_image": uri})
    assert alone["status"] == "failed"
    assert "control_model: control_image and control_model go together" in alone["error"]



def test_control_preprocessor_input_is_the_native_units_preprocessor(cog_server, engine):
    """control_preprocessor canny on an odd-size drawing: the native request with the same unit, pixel for pixel."""
    from sd_core.schema import GenerationRequest

    drawing = Image.new("RGB", (70, 90), (20, 20, 20))
    drawing.paste((230, 230, 230), (15, 25, 50, 70))
    buffer = io.BytesIO()
    drawing.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    unit = {"control_image": uri, "control_model": "tiny-control-a", "control_scale": 1.5}
    edges = cog_server.predict({**FAST, "seed": 9, **unit, "control_preprocessor": "Canny"})
    raw = cog_server.predict({**FAST, "seed": 9, **unit})  # the default: none, the image is the control map
    for prediction in (edges, raw):
        assert prediction["status"] == "succeeded", prediction.get("error")
    native = engine.generate(GenerationRequest(**FAST, seed=9, controlnets=[
        {"model": "tiny-control-a", "image": uri, "scale": 1.5, "preprocessor": "canny"}]))
    got = np.asarray(decode_output(edges["output"][0])[1].convert("RGB"))
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(native.images[0].data)).convert("RGB")))
    assert not np.array_equal(got, np.asarray(decode_output(raw["output"][0])[1].convert("RGB")))
    unknown = cog_server.predict({**FAST, **unit, "control_preprocessor": "depth_zoe"})
    assert unknown["status"] == "failed"
    assert "preprocessor: 'depth_zoe' is not available on this worker" in unknown["error"]


def test_control_units_json_adds_units_to_the_typed_one(cog_server, engine):
    """control_image + two more units in control_units: the native request with the three units, pixel for pixel."""
    from sd_core.schema import GenerationRequest

    maps = []
    for seed in (2, 3):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        maps.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    more = [{"model": "tiny-control-a", "image": maps[1], "scale": 0.7, "start": 0.25},
            {"model": "tiny-control-a", "image": maps[0], "scale": 1.2, "end": 0.5}]
    got = cog_server.predict({**FAST, "seed": 5, "control_image": maps[0], "control_model": "tiny-control-a",
                              "control_units": json.dumps(more)})
    assert got["status"] == "succeeded", got.get("error")
    native = engine.generate(GenerationRequest(**FAST, seed=5, controlnets=[
        {"model": "tiny-control-a", "image": maps[0]}, *more]))
    typed_only = engine.generate(GenerationRequest(**FAST, seed=5, controlnets=[
        {"model": "tiny-control-a", "image": maps[0]}]))
    pixels = np.asarray(decode_output(got["output"][0])[1].convert("RGB"))
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(native.images[0].data)).convert("RGB")))
    assert not np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(typed_only.images[0].data)).convert("RGB")))
    bad = cog_server.predict({**FAST, "control_units": json.dumps([{"model": "tiny-control-a", "image": maps[0],
                                                                     "scale": 9}])})
    assert bad["status"] == "failed" and "scale" in bad["error"] and "Traceback" not in bad["error"]

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


# --- upscale-only (A1111's extra-single-image on Cog) ------------------------------------------------------------


def test_upscale_only_enlarges_the_image_without_generating(cog_server):
    image = data_uri(Image.new("RGB", (32, 24), "red"))
    upscaled = cog_server.predict({"image": image, "upscale_only": 2, "upscaler": "tiny-esrgan-x2"})
    assert upscaled["status"] == "succeeded", upscaled.get("error")
    _, out = decode_output(upscaled["output"][0])
    assert out.size == (64, 48)
    assert "Postprocess upscaler: tiny-esrgan-x2" in out.info["parameters"]
    assert "Using seed" not in upscaled["logs"]  # no generation ran
    lanczos = cog_server.predict({"image": image, "upscale_only": 4})  # the default upscaler: Lanczos
    assert decode_output(lanczos["output"][0])[1].size == (128, 96)
    unknown = cog_server.predict({"image": image, "upscale_only": 2, "upscaler": "4x-Nope"})
    assert unknown["status"] == "failed" and "upscaler: unknown upscaler '4x-Nope'" in unknown["error"]
    missing = cog_server.predict({"upscale_only": 2})
    assert missing["status"] == "failed" and "image" in missing["error"]
