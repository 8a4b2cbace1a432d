"""ControlNet through the RunPod worker's local API: A1111's extension units (alwayson_scripts.controlnet) equal the
native `controlnets` units; /controlnet/model_list and /controlnet/module_list in the extension's shapes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from tests.fixtures.runpod_server import start_runpod_server

PAYLOAD = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler",
           "cfg_scale": 7}


@pytest.fixture(scope="module")
def server(runpod_weights_env, tmp_path_factory):
    with start_runpod_server(runpod_weights_env, log_dir=tmp_path_factory.mktemp("runpod-controlnet")) as server:
        yield server


def completed(job: dict):
    assert job["status"] == "COMPLETED", job.get("error", job)
    return job["output"]


def failed(job: dict) -> str:
    assert job["status"] == "FAILED", job
    assert "Traceback" not in job["error"]
    return job["error"]


def control_b64(seed: int = 1) -> str:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(output: dict) -> bytes:
    images = output["images"]
    data = images[0]["image"] if isinstance(images[0], dict) else images[0]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").tobytes()


def test_controlnet_listings_in_the_extension_shapes(server):
    models = completed(server.runsync({"api": {"method": "GET", "endpoint": "/controlnet/model_list"}}))
    assert models == {"model_list": ["tiny-control-a", "tiny-control-b", "tiny-sd3-control", "tiny-xl-control",
                                     "tiny-xl-control-union"]}
    modules = completed(server.runsync({"api": {"method": "GET", "endpoint": "/controlnet/module_list"}}))
    assert modules == {"module_list": ["none", "canny", "lineart_standard", "lineart_realistic", "lineart_coarse",
                                       "softedge_pidinet", "softedge_pidisafe", "scribble_pidinet",
                                       "depth_anything", "depth_anything_v2", "mlsd", "lineart_anime"]}
    error = failed(server.runsync({"api": {"method": "POST", "endpoint": "/controlnet/model_list"}}))
    assert error.startswith("api.method: only GET is served for /controlnet/model_list")


def test_an_a1111_unit_equals_the_native_unit_and_a_disabled_one_changes_nothing(server):
    unit = {"enabled": True, "image": control_b64(), "module": "none", "model": "tiny-control-a [d14c016b]",
            "weight": 0.8, "guidance_start": 0, "guidance_end": 0.5, "control_mode": "Balanced",
            "resize_mode": "Just Resize", "pixel_perfect": False, "processor_res": 512, "lowvram": False}
    a1111_output = completed(server.runsync({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [unit]}}}))
    native = {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 9, "scheduler": "Euler",
              "guidance_scale": 7, "controlnets": [{"model": "tiny-control-a", "image": control_b64(), "scale": 0.8,
                                                    "end": 0.5}]}
    native_output = completed(server.runsync(native))
    plain = completed(server.runsync(PAYLOAD))
    assert pixels(a1111_output) == pixels(native_output)
    assert pixels(a1111_output) != pixels(plain)
    off = [{**unit, "enabled": False}, {**unit, "weight": 0}]
    assert pixels(completed(server.runsync({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": off}}}))) == (
        pixels(plain))


def test_a1111_unit_translation():
    unit = {"image": {"image": "abc", "mask": None}, "module": "Canny", "model": "tiny-control-a.safetensors",
            "control_mode": 2, "resize_mode": 2, "threshold_a": 50.0, "threshold_b": -1, "processor_res": -1}
    request = a1111.to_request(a1111.parse_call({**PAYLOAD, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}))
    translated = request.controlnets[0]
    assert (translated.model, translated.image, translated.preprocessor, translated.mode) == (
        "tiny-control-a", "abc", "canny", "control")
    assert (translated.resize_mode, translated.low_threshold, translated.high_threshold, translated.processor_res) == (
        "resize_and_fill", 50, 200, 512)
    perfect = a1111.to_request(a1111.parse_call({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "pixel_perfect": True}]}}}))
    assert perfect.controlnets[0].processor_res is None  # detected at the output size
    assert a1111.to_request(a1111.parse_call({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [
        {"model": "m", "image": "x"}]}}})).controlnets[0].resize_mode == "crop_and_resize"  # the extension's default


def test_an_a1111_lineart_unit_equals_the_native_unit_and_is_not_the_raw_image(server):
    unit = {"image": control_b64(), "module": "lineart", "model": "tiny-control-a", "processor_res": 128,
            "threshold_a": 64, "threshold_b": 64}  # the extension's lineart has no sliders: thresholds unused
    a1111_output = completed(server.runsync({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [unit]}}}))
    native = {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 9, "scheduler": "Euler",
              "guidance_scale": 7, "controlnets": [{"model": "tiny-control-a", "image": control_b64(),
                                                    "preprocessor": "lineart_realistic", "processor_res": 128,
                                                    "resize_mode": "crop_and_resize"}]}
    assert pixels(a1111_output) == pixels(completed(server.runsync(native)))
    raw = {**unit, "module": "none"}
    assert pixels(a1111_output) != pixels(completed(server.runsync(
        {**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [raw]}}})))
    error = failed(server.runsync({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "module": "softedge_hed"}]}}}))
    assert error.startswith("controlnets.0.preprocessor: 'softedge_hed' has no weights on this worker; available: "
                            "none, canny, lineart_standard, lineart_realistic")


def test_a1111_module_names_and_resolution():
    def translated(**unit):
        full = {"image": "abc", "model": "tiny-control-a", **unit}
        call = a1111.parse_call({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [full]}}})
        return a1111.to_request(call).controlnets[0]

    assert (translated(module="pidinet_scribble").preprocessor, translated(module="hed").preprocessor) == (
        "scribble_pidinet", "softedge_hed")
    assert translated(module="Lineart_Coarse", processor_res=-1).processor_res == 512  # the extension's default
    assert translated(module="lineart", pixel_perfect=True).processor_res is None  # at the output size
    assert translated(module="none", processor_res=256).processor_res is None  # none has no resolution


@pytest.mark.parametrize(("unit", "expected"), [
    ({"module": "depth_midas"}, "args.0.module: 'depth_midas' is not available on this worker (its network needs "
                                "timm and torchvision, which this worker does not install); available: none, "
                                "canny, lineart_standard, lineart_realistic"),
    ({"frobnicate": 1}, "args.0.frobnicate: not supported by this worker"),
    ({"mask": "abc"}, "args.0.mask: a ControlNet mask is not supported"),
    ({"control_mode": 7}, "args.0.control_mode: expected one of"),
    ({"weight": 3}, "args.0.weight: Input should be less than or equal to 2"),
    ({"guidance_start": 0.6, "guidance_end": 0.5}, "args.0.start (0.6) must be below end (0.5)"),
    ({"model": "None"}, "args.0.model: expected a ControlNet model name"),
    ({"input_mode": "batch"}, "args.0.input_mode: not supported by this worker"),
])
def test_a1111_units_that_cannot_be_honoured_are_refused_by_key(unit, expected):
    full = {"image": "abc", "model": "tiny-control-a", **unit}
    with pytest.raises(InvalidRequest) as caught:
        a1111.to_request(a1111.parse_call({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [full]}}}))
    assert f"alwayson_scripts.controlnet.{expected}" in str(caught.value)


def test_my_prompt_is_more_important_equals_the_native_prompt_mode(server):
    unit = {"image": control_b64(), "model": "tiny-control-a", "control_mode": "My prompt is more important"}
    a1111_output = completed(server.runsync({**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": [unit]}}}))
    native = {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 9, "scheduler": "Euler",
              "guidance_scale": 7, "controlnets": [{"model": "tiny-control-a", "image": control_b64()}]}
    prompt_mode = completed(server.runsync({**native, "controlnets": [{**native["controlnets"][0], "mode": "prompt"}]}))
    balanced = completed(server.runsync(native))
    assert pixels(a1111_output) == pixels(prompt_mode)
    assert pixels(prompt_mode) != pixels(balanced)
