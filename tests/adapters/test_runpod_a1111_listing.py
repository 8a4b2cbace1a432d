"""A1111's listing endpoints and extension units through the RunPod worker's local API (sd_core/a1111_listing.py,
sd_core/a1111_scripts.py): A1111's response shapes, /progress and /interrupt pointed at RunPod's own."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.fixtures.runpod_server import start_runpod_server


@pytest.fixture(scope="module")
def server(runpod_weights_env, tmp_path_factory):
    with start_runpod_server(runpod_weights_env, log_dir=tmp_path_factory.mktemp("runpod-a1111")) as server:
        yield server


def get(endpoint: str) -> dict:
    return {"api": {"method": "GET", "endpoint": f"/sdapi/v1/{endpoint}"}}


def completed(job: dict):
    assert job["status"] == "COMPLETED", job.get("error", job)
    return job["output"]


def failed(job: dict) -> str:
    assert job["status"] == "FAILED", job
    assert "Traceback" not in job["error"]
    return job["error"]


def test_sd_models_lists_the_catalog_as_a1111_sd_model_items(server):
    models = completed(server.runsync(get("sd-models")))
    assert [m["model_name"] for m in models] == [
        "tiny-flux-dev", "tiny-flux-fill-single", "tiny-flux-fill", "tiny-flux-single", "tiny-flux", "tiny-sd15-single",
        "tiny-sd15", "tiny-sd3-no-t5", "tiny-sd3-single", "tiny-sd3", "tiny-sdxl-refiner", "tiny-sdxl-single",
        "tiny-sdxl"]
    for item in models:
        assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert item["title"] == item["model_name"] and item["hash"] is None  # the tiny manifests pin no sha256
    by_name = {m["model_name"]: m for m in models}
    assert by_name["tiny-sd15"]["filename"] == "tiny-sd15/diffusers/"
    # A title sent back as the checkpoint picks that model.
    title = by_name["tiny-sdxl"]["title"]
    output = completed(server.runsync({"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": title}}))
    assert '"sd_model_name": "tiny-sdxl"' in output["info"]


def test_samplers_and_schedulers_in_a1111_shapes(server):
    samplers = completed(server.runsync({"api": {"endpoint": "/sdapi/v1/samplers"}}))  # no method: the endpoint's own
    by_name = {item["name"]: item for item in samplers}
    assert all(set(item) == {"name", "aliases", "options"} for item in samplers)
    assert "DPM++ 2M" in by_name and "DPM++ 2M Karras" not in by_name  # A1111 1.9+: schedules are listed apart
    assert by_name["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert by_name["Euler a"]["options"] == {} and "k_euler_a" in by_name["Euler a"]["aliases"]
    schedulers = completed(server.runsync(get("schedulers")))
    assert [item["label"] for item in schedulers] == ["Automatic", "Uniform", "Karras", "Exponential", "Beta",
                                                      "SGM Uniform", "Align Your Steps", "Normal"]
    assert [item["name"] for item in schedulers][-3:] == ["sgm_uniform", "align_your_steps", "normal"]  # A1111's
    karras = schedulers[2]
    assert karras == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                      "need_inner_model": False}
    # Every listed sampler and schedule is accepted back.
    completed(server.runsync({"prompt": "x", "steps": 1, "sampler_name": "DPM++ 2M", "scheduler": karras["label"]}))
    completed(server.runsync({"prompt": "x", "steps": 1, "sampler_name": "Euler", "scheduler": schedulers[-3]["name"]}))
    completed(server.runsync({"prompt": "x", "steps": 1, "sampler_name": "Euler", "scheduler": schedulers[-1]["name"]}))


def test_loras_embeddings_vae_upscalers_and_options(server):
    loras = completed(server.runsync(get("loras")))
    assert {"tiny-style", "tiny-style-kohya", "tiny-xl-style"} <= {lora["name"] for lora in loras}
    assert all(set(lora) == {"name", "alias", "path", "metadata"} for lora in loras)
    by_name = {lora["name"]: lora for lora in loras}
    assert by_name["tiny-style"] == {"name": "tiny-style", "alias": "tiny-style",
                                     "path": "loras/tiny-sd15-peft.safetensors", "metadata": {}}
    none = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert completed(server.runsync(get("embeddings"))) == {  # the manifests' (the bucket is remote: their numbers)
        "loaded": {"tiny-neg": {**none, "shape": 32, "vectors": 2}, "tiny-xl-neg": {**none, "shape": 96, "vectors": 2}},
        "skipped": {}}
    vaes = completed(server.runsync(get("sd-vae")))  # the manifests' `vaes:`, each name once
    assert vaes == [{"model_name": "tiny-vae", "filename": "vaes/tiny-sd15-vae.safetensors"},
                    {"model_name": "tiny-vae-folder", "filename": "vaes/tiny-sd15-vae/"},
                    {"model_name": "tiny-xl-vae", "filename": "vaes/tiny-sdxl-vae.safetensors"},
                    {"model_name": "tiny-xl-vae-folder", "filename": "vaes/tiny-sdxl-vae/"}]
    upscalers = completed(server.runsync({"api": "upscalers"}))
    assert [item["name"] for item in upscalers] == ["None", "Lanczos", "Nearest", "tiny-esrgan-x2", "tiny-esrgan-x4"]
    assert all(set(item) == {"name", "model_name", "model_path", "model_url", "scale"} for item in upscalers)
    assert upscalers[4] == {"name": "tiny-esrgan-x4", "model_name": "tiny-esrgan-x4", "model_url": None,
                            "model_path": "tiny-upscalers/tiny-esrgan-x4.safetensors", "scale": 4}
    # An upscale-only job through A1111's extra-single-image, and the native form.
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    extras = completed(server.runsync({"api": {"method": "POST", "endpoint": "/sdapi/v1/extra-single-image"},
                                       "payload": {"image": image, "upscaler_1": "tiny-esrgan-x4",
                                                   "upscaling_resize": 4}}))
    assert set(extras) == {"html_info", "image"} and "Postprocess upscaler: tiny-esrgan-x4" in extras["html_info"]
    assert Image.open(io.BytesIO(base64.b64decode(extras["image"]))).size == (128, 96)
    native = completed(server.runsync({"upscale": {"image": image, "upscaler": "tiny-esrgan-x2", "scale": 2}}))
    assert (native["images"][0]["width"], native["images"][0]["height"]) == (64, 48)
    assert "codeformer_visibility: face restoration" in failed(server.runsync(
        {"api": "extra-single-image", "image": image, "codeformer_visibility": 1}))
    options = completed(server.runsync(get("options")))
    assert options["sd_model_checkpoint"] == "tiny-sd15"
    assert (options["CLIP_stop_at_last_layers"], options["sd_vae"]) == (1, "Automatic")


@pytest.mark.parametrize(("job_input", "expected"), [
    (get("progress"), "api.endpoint: /sdapi/v1/progress is not served by this worker; use RunPod's /status/"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/interrupt"}}, "use RunPod's /cancel/<job id>"),
    ({"api": "skip"}, "api: /sdapi/v1/skip is not served by this worker; use RunPod's /cancel/"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/options"}, "payload": {"sd_vae": "x"}},
     "api.method: only GET is served for /sdapi/v1/options (got 'POST'); options are read-only here"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/sd-models"}}, "api.method: only GET is served"),
    ({"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}, "payload": {"x": 1}},
     "payload: /sdapi/v1/samplers takes no payload"),
    ({"api": "loras", "prompt": "x"}, "payload: /sdapi/v1/loras takes no payload"),
])
def test_listing_misuse_and_platform_endpoints_fail_clearly(server, job_input, expected):
    assert expected in failed(server.runsync(job_input, timeout=60))


def pixels(output: dict) -> bytes:
    image = Image.open(io.BytesIO(base64.b64decode(output["images"][0])))
    return image.tobytes()


def test_disabled_extension_units_change_nothing_and_enabled_ones_are_refused(server):
    payload = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 9}
    plain = pixels(completed(server.runsync(payload)))
    disabled = {"ADetailer": {"args": [False, False, {"ad_model": "face_yolov8n.pt"}]},
                "controlnet": {"args": [{"enabled": False, "module": "canny", "model": "x"}]},
                "Dynamic Prompts v2.17.1": {"args": []}}
    assert pixels(completed(server.runsync({**payload, "alwayson_scripts": disabled}))) == plain
    error = failed(server.runsync({**payload, "alwayson_scripts": {**disabled, "ADetailer": {"args": [True]}}}))
    assert error == "alwayson_scripts.ADetailer: not supported by this worker"
    units = {"controlnet": {"args": [{"enabled": False}, {"module": "canny"}]}}  # a unit without "enabled" runs
    assert failed(server.runsync({**payload, "alwayson_scripts": units})).startswith(
        "alwayson_scripts.controlnet.args.1.image: expected the control image")
