"""ComfyUI API workflows on the RunPod worker's local API: worker-comfyui's shapes, the native request's images."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from sd_core import comfy_samplers
from tests.fixtures.runpod_server import start_runpod_server

DATA = Path(__file__).resolve().parents[1] / "data" / "comfy"
FLUX_64 = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)  # ComfyUI's ModelSamplingFlux shift at 64x64


@pytest.fixture(scope="module")
def server(runpod_weights_env, tmp_path_factory):
    with start_runpod_server(runpod_weights_env, log_dir=tmp_path_factory.mktemp("runpod-comfy")) as server:
        yield server


def workflow(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(b64: str) -> bytes:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.tobytes()


def completed(job: dict) -> dict:
    assert job["status"] == "COMPLETED", job.get("error", job)
    return job["output"]


def native(server, request: dict) -> list[bytes]:
    return [pixels(entry["image"]) for entry in completed(server.runsync(request))["images"]]


def comfy(server, name: str, images=None) -> list[dict]:
    body = {"workflow": workflow(name), **({"images": images} if images else {})}
    return completed(server.runsync(body))["images"]


def test_default_graph_gives_the_native_requests_images(server):
    images = comfy(server, "txt2img")
    assert [(e["filename"], e["type"]) for e in images] == [("ComfyUI_00001_.png", "base64"),
                                                            ("ComfyUI_00002_.png", "base64")]
    assert [pixels(e["data"]) for e in images] == native(server, {
        "prompt": "a red fox in the snow", "negative_prompt": "blurry", "model": "tiny-sd15", "width": 64,
        "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5, "scheduler": "Euler Normal", "seed": 42,
        "num_outputs": 2})


def test_img2img_graph_gives_the_native_img2img(server):
    init = png_b64(Image.new("RGB", (64, 64), (200, 60, 30)))
    [image] = comfy(server, "img2img", [{"name": "init.png", "image": init}])
    assert image["filename"] == "img2img_00001_.png"
    # denoise 0.5 of 2 steps: the last 2 steps of a 4-step schedule, as ComfyUI runs it
    assert [pixels(image["data"])] == native(server, {
        "prompt": "a watercolour fox", "num_inference_steps": 4, "strength": 0.5, "guidance_scale": 6,
        "scheduler": "DPM++ 2M Karras", "seed": 7, "image": init})


def test_inpaint_graph_takes_the_masks_channel(server):
    photo = png_b64(Image.new("RGB", (64, 64), (20, 120, 220)))
    mask_image = Image.new("RGB", (64, 64), (0, 255, 255))
    mask_image.paste((255, 0, 0), (0, 0, 32, 64))  # red (repaint) on the left half only
    [image] = comfy(server, "inpaint", [{"name": "photo.png", "image": photo},
                                        {"name": "mask.png", "image": png_b64(mask_image)}])
    red = png_b64(mask_image.getchannel("R"))
    # denoise 0.75 of 4 steps: the last 4 of a 5-step schedule
    assert [pixels(image["data"])] == native(server, {
        "prompt": "a hat", "num_inference_steps": 5, "strength": 0.8, "guidance_scale": 7,
        "scheduler": "DPM++ 2M SDE Exponential",
        "seed": 3, "image": photo, "mask": red})


def test_lora_chain_gives_the_native_loras(server):
    [image] = comfy(server, "lora_chain")
    assert image["filename"] == "lora_00001_.png"
    expected = native(server, {
        "prompt": "a fox", "num_inference_steps": 2, "guidance_scale": 7, "scheduler": "Euler Normal", "seed": 21,
        "width": 64, "height": 64, "clip_skip": 1,
        "loras": [{"source": "tiny-style", "scale": 0.8, "text_encoder_scale": 0.5},
                  {"source": "tiny-style-kohya", "scale": 0.6, "text_encoder_scale": 0.0}]})
    assert [pixels(image["data"])] == expected
    plain = native(server, {"prompt": "a fox", "num_inference_steps": 2, "guidance_scale": 7,
                            "scheduler": "Euler Normal",
                            "seed": 21, "width": 64, "height": 64, "clip_skip": 1})
    assert plain != expected  # the LoRAs change the image


def test_two_pass_hires_graph_gives_the_native_hires(server):
    [image] = comfy(server, "hires")
    assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == (128, 128)
    assert [pixels(image["data"])] == native(server, {
        "prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 5, "width": 64, "height": 64,
        "scheduler": "Euler Normal", "seed": 8, "hires": {"upscaler": "Latent (nearest-exact)", "steps": 2,
                                                   "denoising_strength": 0.5}})


@pytest.mark.parametrize(("node", "change", "expected"), [
    ("3", {"class_type": "MagicSampler"}, "node '3' ('MagicSampler'): class_type 'MagicSampler' is not supported"),
    ("8", {"inputs": {"samples": ["3", 0]}}, "node '8' (VAEDecode): missing input 'vae'"),
    ("8", {"inputs": {"samples": ["77", 0], "vae": ["4", 2]}}, "node '8' (VAEDecode): input 'samples' links to "
                                                               "node '77', which is not in the workflow"),
    ("5", {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["4", 2]}}, "is part of a cycle"),
])
def test_bad_workflows_fail_naming_the_node(server, node, change, expected):
    graph = workflow("txt2img")
    graph[node] = {**graph[node], **change}
    job = server.runsync({"workflow": graph})
    assert job["status"] == "FAILED" and expected in job["error"] and job["error"].startswith("workflow: ")
    assert "Traceback" not in job["error"]


def test_model_upscaler_hires_graph_with_a_preview_of_the_first_pass(server):
    upscaled, preview = comfy(server, "hires_model")
    assert (upscaled["filename"], preview["filename"]) == ("upscaled_00001_.png", "ComfyUI_00002_.png")
    first = {"prompt": "a lighthouse", "num_inference_steps": 2, "guidance_scale": 5, "width": 64, "height": 64,
             "scheduler": "DPM++ 2M Karras", "seed": 8}
    assert [pixels(preview["data"])] == native(server, first)
    # denoise 0.6 of 3 steps: the last 3 of a 5-step schedule, at the upscaler model's own scale (2)
    assert [pixels(upscaled["data"])] == native(server, {**first, "hires": {
        "upscaler": "tiny-esrgan-x2", "scale": 2, "steps": 3, "denoising_strength": 0.6}})
    assert Image.open(io.BytesIO(base64.b64decode(upscaled["data"]))).size == (128, 128)


def test_with_an_output_bucket_images_are_presigned_urls(runpod_weights_env, s3_server, tmp_path_factory):
    bucket = s3_server.make_bucket("comfy-results")
    env = {**runpod_weights_env, "BUCKET_ENDPOINT_URL": f"{s3_server.endpoint_url}/{bucket}/out",
           "BUCKET_ACCESS_KEY_ID": s3_server.access_key, "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key}
    with start_runpod_server(env, log_dir=tmp_path_factory.mktemp("runpod-comfy-bucket")) as server:
        job = server.runsync({"workflow": workflow("txt2img")})
        images = completed(job)["images"]
    assert [(e["filename"], e["type"]) for e in images] == [("ComfyUI_00001_.png", "s3_url"),
                                                            ("ComfyUI_00002_.png", "s3_url")]
    for entry in images:
        response = requests.get(entry["data"], timeout=30)
        assert response.status_code == 200 and f"/{bucket}/out/{job['id']}/" in entry["data"]
        Image.open(io.BytesIO(response.content)).verify()


def test_controlnet_graph_gives_the_native_controlnet_request(server):
    import numpy as np

    edges = png_b64(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    [image] = comfy(server, "controlnet", [{"name": "edges.png", "image": edges}])
    assert image["filename"] == "controlnet_00001_.png"
    plain = {"prompt": "a fox on a rock", "negative_prompt": "blurry", "model": "tiny-sd15", "width": 64, "height": 64,
             "num_inference_steps": 2, "guidance_scale": 7, "scheduler": "Euler Normal", "seed": 5}
    expected = native(server, {**plain, "controlnets": [{"model": "tiny-control-a", "image": edges, "scale": 0.8}]})
    assert [pixels(image["data"])] == expected
    assert native(server, plain) != expected  # the ControlNet changes the image
    graph = workflow("controlnet")
    graph["13"]["inputs"]["end_percent"] = 0.5  # noise at timestep 499.5: of the 2 steps (999, 0) only the first
    windowed = completed(server.runsync({"workflow": graph, "images": [{"name": "edges.png", "image": edges}]}))
    assert [pixels(windowed["images"][0]["data"])] == native(server, {**plain, "controlnets": [
        {"model": "tiny-control-a", "image": edges, "scale": 0.8, "end": 0.5}]}) != expected


def test_controlnet_wirings_without_an_exact_equivalent_fail_naming_the_node(server):
    edges = [{"name": "edges.png", "image": png_b64(Image.new("RGB", (64, 64), (255, 255, 255)))}]
    graph = workflow("controlnet")
    graph["3"]["inputs"]["negative"] = ["7", 0]  # the ControlNet on the positive prompt only, at cfg 7
    job = server.runsync({"workflow": graph, "images": edges})
    assert job["status"] == "FAILED" and job["error"].startswith(
        "workflow: node '13' (ControlNetApplyAdvanced): it steers only the positive prompt of node '3' (KSampler)")
    graph = workflow("controlnet")
    graph["12"]["inputs"]["control_net_name"] = "control_v11p_sd15_canny [d14c016b]"  # not in the manifests
    job = server.runsync({"workflow": graph, "images": edges})
    assert job["status"] == "FAILED" and job["error"].startswith(
        "workflow: node '12' (ControlNetLoader): unknown ControlNet 'control_v11p_sd15_canny'"), job["error"]


def test_flux_dev_workflow_gives_the_native_flux_request(server):
    # UNETLoader + DualCLIPLoader + VAELoader, FluxGuidance, ModelSamplingFlux, SamplerCustomAdvanced: ComfyUI's
    # FLUX dev example, on the tiny dev-like FLUX model
    [image] = comfy(server, "flux_dev")
    request = {"model": "tiny-flux-dev", "prompt": "a red fox in the snow", "seed": 42, "guidance_scale": 5.0,
               "num_inference_steps": 4, "scheduler": "Euler", "width": 64, "height": 64}
    expected = native(server, {**request, "sigmas": comfy_samplers.flow_schedule(None, "simple", 4, FLUX_64)})
    assert [pixels(image["data"])] == expected
    assert expected != native(server, {"model": "tiny-flux-dev", "prompt": "a red fox in the snow", "seed": 42,
                                       "guidance_scale": 3.5, "num_inference_steps": 4})  # the guidance counts


def test_flux_checkpoint_workflow_gives_the_native_flux_request(server):
    images = comfy(server, "flux_checkpoint")
    assert [e["filename"] for e in images] == ["flux_00001_.png", "flux_00002_.png"]
    assert [pixels(e["data"]) for e in images] == native(server, {
        "model": "tiny-flux-dev", "prompt": "a snowy mountain cabin", "seed": 7, "guidance_scale": 2.5,
        "num_inference_steps": 4, "width": 64, "height": 64, "num_outputs": 2,
        "sigmas": comfy_samplers.flow_schedule(None, "simple", 4, FLUX_64)})


def test_flux_schedules_run_comfyuis_sigmas_whatever_the_models_scheduler_config(server):
    graph = workflow("flux_checkpoint")
    graph["4"]["inputs"]["ckpt_name"] = "tiny-flux.safetensors"  # a guidance embedding, schnell's unshifted config
    graph["3"]["inputs"].update(steps=3, scheduler="beta")  # ComfyUI: ModelSamplingFlux's shift, 3 beta steps
    images = completed(server.runsync({"workflow": graph}))["images"]
    assert [pixels(e["data"]) for e in images] == native(server, {
        "model": "tiny-flux", "prompt": "a snowy mountain cabin", "seed": 7, "guidance_scale": 2.5, "width": 64,
        "height": 64, "num_outputs": 2, "sigmas": comfy_samplers.flow_schedule(None, "beta", 3, FLUX_64)})
    graph["3"]["inputs"]["model"] = ["4", 0]  # no ModelSamplingFlux: ComfyUI's default for a guidance-embedding model
    del graph["30"]
    images = completed(server.runsync({"workflow": graph}))["images"]
    assert [pixels(e["data"]) for e in images] == native(server, {
        "model": "tiny-flux", "prompt": "a snowy mountain cabin", "seed": 7, "guidance_scale": 2.5, "width": 64,
        "height": 64, "num_outputs": 2, "sigmas": comfy_samplers.flow_schedule(None, "beta", 3, 1.15)})
    graph = workflow("flux_dev")
    graph["12"]["inputs"]["unet_name"] = "tiny-sdxl.safetensors"
    job = server.runsync({"workflow": graph})
    assert job["status"] == "FAILED" and job["error"].startswith(
        "workflow: node '12' (UNETLoader): unet_name 'tiny-sdxl.safetensors' is a sdxl model, not a FLUX model"), job


def test_sd3_workflow_gives_the_native_sd3_request(server):
    # TripleCLIPLoader, CLIPTextEncodeSD3, ModelSamplingSD3 (shift 3.0 = the model's), a negative split over two
    # timestep ranges of one prompt, KSampler euler + normal at cfg 4.5: one native SD3 request, T5 at 77 tokens
    [image] = comfy(server, "sd3")
    assert image["filename"] == "sd3_00001_.png"
    request = {"model": "tiny-sd3", "prompt": "a red fox in the snow", "negative_prompt": "blurry", "seed": 11,
               "guidance_scale": 4.5, "num_inference_steps": 3, "scheduler": "Euler", "width": 64, "height": 64,
               "max_sequence_length": 77, "sigmas": comfy_samplers.flow_schedule(None, "normal", 3, None, 3.0)}
    expected = native(server, request)
    assert [pixels(image["data"])] == expected
    assert expected != native(server, {**request, "negative_prompt": ""})  # the negative prompt counts (real CFG)


def test_sd3_prompts_and_models_without_an_exact_equivalent_fail_naming_the_node(server):
    graph = workflow("sd3")
    graph["4"]["inputs"]["ckpt_name"] = "tiny-sd3-no-t5.safetensors"
    job = server.runsync({"workflow": graph})
    assert job["status"] == "FAILED" and job["error"].startswith(
        "workflow: node '16' (CLIPTextEncodeSD3): the model 'tiny-sd3-no-t5' runs without its T5 encoder"), job
    graph = workflow("sd3")
    graph["40"]["inputs"]["text"] = " ".join(["fox"] * 80)  # over 77 CLIP tokens: ComfyUI encodes a second chunk
    job = server.runsync({"workflow": graph})
    assert job["status"] == "FAILED" and job["error"].startswith(
        "workflow: node '40' (CLIPTextEncode): the prompt is ") and " tokens for tokenizer, over 77: " in job["error"]
