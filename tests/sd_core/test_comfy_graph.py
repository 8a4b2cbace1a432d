"""ComfyUI API workflows (sd_core/comfy_graph.py, comfy_nodes.py): validation and translation, before any GPU work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from sd_core import comfy_jobs, comfy_samplers
from sd_core.errors import InvalidRequest
from sd_core.schedulers import build_scheduler, pipeline_kwargs

DATA = Path(__file__).resolve().parents[1] / "data" / "comfy"


def workflow(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def refused(graph: dict, images=None) -> str:
    with pytest.raises(InvalidRequest) as info:
        comfy_jobs.translate({"workflow": graph, **({"images": images} if images is not None else {})})
    message = str(info.value)
    assert message.startswith(("workflow: ", "images: ", "input: ")) and "Traceback" not in message
    return message


def edited(name: str, node: str, **inputs) -> dict:
    graph = copy.deepcopy(workflow(name))
    graph[node]["inputs"].update(inputs)
    return graph


def test_default_graph_translates_to_the_native_request():
    [output] = comfy_jobs.translate({"workflow": workflow("txt2img")})
    assert output.prefix == "ComfyUI" and output.node.id == "9"
    assert output.request.model_dump(exclude_defaults=True) == {
        "prompt": "a red fox in the snow", "negative_prompt": "blurry", "model": "tiny-sd15", "width": 64,
        "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5, "scheduler": "Euler Normal", "seed": 42,
        "num_outputs": 2}


def test_lora_chain_clip_skip_and_whole_range_advanced_sampler():
    [output] = comfy_jobs.translate({"workflow": workflow("lora_chain")})
    request = output.request
    assert [(s.source, s.scale, s.text_encoder_scale) for s in request.loras] == [
        ("tiny-style", 0.8, 0.5), ("tiny-style-kohya", 0.6, 0.0)]  # from the checkpoint out, as ComfyUI applies
    assert request.clip_skip == 1 and request.num_inference_steps == 2 and request.seed == 21


@pytest.mark.parametrize(("steps", "denoise", "schedule"), [(2, 0.5, 4), (20, 0.75, 26), (4, 0.75, 5), (3, 1.0, 3)])
def test_denoise_runs_the_last_steps_of_comfyuis_longer_schedule(steps, denoise, schedule):
    graph = edited("hires", "11", steps=steps, denoise=denoise)
    [output] = comfy_jobs.translate({"workflow": graph})
    hires = output.request.hires
    assert hires.steps == steps
    assert int(schedule * hires.denoising_strength) == steps > int((schedule - 1) * hires.denoising_strength)


def test_hires_graph_maps_to_the_hires_fix():
    [output] = comfy_jobs.translate({"workflow": workflow("hires")})
    hires = output.request.hires
    assert (hires.width, hires.height, hires.upscaler, hires.steps, hires.denoising_strength) == (
        128, 128, "Latent (nearest-exact)", 2, 0.5)
    assert output.request.width == 64


@pytest.mark.parametrize(("sampler", "scheduler", "expected"), [
    ("euler", "normal", "Euler Normal"), ("ddim", "normal", "Euler Normal"), ("dpmpp_2m", "karras", "DPM++ 2M Karras"),
    ("dpmpp_2m", "exponential", "DPM++ 2M Exponential"), ("dpmpp_2m_sde", "karras", "DPM++ 2M SDE Karras"),
    ("dpmpp_2m_sde_gpu", "exponential", "DPM++ 2M SDE Exponential"), ("euler", "karras", "Euler Karras"),
    ("euler", "sgm_uniform", "Euler SGM Uniform"), ("euler_ancestral", "normal", "Euler a Normal"),
    ("heun", "normal", "Heun Normal"), ("lms", "exponential", "LMS Exponential"),
    ("dpmpp_sde_gpu", "karras", "DPM++ SDE Karras"),
])
def test_sampler_and_scheduler_names(sampler, scheduler, expected):
    [output] = comfy_jobs.translate({"workflow": edited("txt2img", "3", sampler_name=sampler, scheduler=scheduler)})
    assert output.request.scheduler == expected


@pytest.mark.parametrize(("sampler", "scheduler", "expected"), [
    ("uni_pc", "normal", "sampler_name 'uni_pc' and scheduler 'normal' has no exact equivalent"),
    ("dpmpp_2m", "normal", "sampler_name 'dpmpp_2m' and scheduler 'normal' has no exact equivalent"),
    ("euler_ancestral", "karras", "sampler_name 'euler_ancestral' and scheduler 'karras' has no exact equivalent"),
    ("heun", "sgm_uniform", "sampler_name 'heun' and scheduler 'sgm_uniform' has no exact equivalent"),
    ("dpm_2", "karras", "sampler_name 'dpm_2' and scheduler 'karras' has no exact equivalent"),
    ("euler_ancestral", "beta", "sampler_name 'euler_ancestral' and scheduler 'beta' has no exact equivalent"),
    ("dpmpp_3m_sde", "karras", "sampler_name 'dpmpp_3m_sde' and scheduler 'karras' has no exact equivalent"),
    ("dpmpp_2m", "simple", "sampler_name 'dpmpp_2m' and scheduler 'simple' has no exact equivalent"),
    ("nope", "normal", "sampler_name 'nope' is unknown (with sampler_name 'nope' and scheduler 'normal')"),
    ("euler", "bogus", "scheduler 'bogus' is unknown"),
])
def test_samplers_without_an_exact_equivalent_are_refused(sampler, scheduler, expected):
    message = refused(edited("txt2img", "3", sampler_name=sampler, scheduler=scheduler))
    assert "node '3' (KSampler)" in message and expected in message and "supported: ddim + exponential" in message
    assert "euler + normal" in message and "heun + karras" in message


# --- the facts behind comfy_samplers.EXACT: ComfyUI's schedules, recomputed here from their definitions -------------
SD_CONFIG = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}


def comfy_sigmas(scheduler: str, steps: int) -> np.ndarray:
    """ComfyUI's schedule for SD 1.5 / SDXL (comfy/samplers.py, k-diffusion's get_sigmas_karras/exponential)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1 - betas)
    sigmas = ((1 - cumprod) / cumprod) ** 0.5
    low, high = sigmas[0], sigmas[-1]
    if scheduler in ("normal", "sgm_uniform"):  # timesteps evenly spaced from 999 to 0, log sigma interpolated
        t = np.linspace(999, 0, steps) if scheduler == "normal" else np.linspace(999, 0, steps + 1)[:-1]
        lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
        out = np.exp((1 - (t - lo)) * np.log(sigmas[lo]) + (t - lo) * np.log(sigmas[hi]))
    elif scheduler == "karras":
        ramp = np.linspace(0, 1, steps)
        out = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    else:  # exponential
        out = np.exp(np.linspace(np.log(high), np.log(low), steps))
    return np.append(out, 0.0)


@pytest.mark.parametrize("steps", [3, 10, 20, 33])
@pytest.mark.parametrize(("sampler", "scheduler"), sorted(comfy_samplers.EXACT))
def test_exact_pairs_run_comfyuis_sigmas(sampler, scheduler, steps):
    name = comfy_samplers.scheduler_name(None, sampler, scheduler)
    built = build_scheduler(name, SD_CONFIG)
    sigmas = pipeline_kwargs(name, steps, None, (), built).get("sigmas")  # what the pipeline call gets
    built.set_timesteps(**({"sigmas": sigmas} if sigmas else {"num_inference_steps": steps}))
    got = np.asarray(built.sigmas, dtype=np.float64)
    if len(got) == 2 * steps:  # Heun and DPM++ SDE repeat each sigma but the first and the last
        got = np.append(got[0::2], got[-1])
    np.testing.assert_allclose(got, comfy_sigmas(scheduler, steps), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(("cls", "scheduler"), [("DPMSolverMultistepScheduler", "normal"),
                                                ("DPMSolverMultistepScheduler", "sgm_uniform"),
                                                ("EulerAncestralDiscreteScheduler", "sgm_uniform"),
                                                ("HeunDiscreteScheduler", "sgm_uniform")])
def test_refused_pairs_would_not_run_comfyuis_sigmas(cls, scheduler):
    """The closest diffusers spacing for a refused pair is off by more than float noise (rounded timesteps)."""
    import diffusers

    for spacing in ("linspace", "leading", "trailing"):
        built = getattr(diffusers, cls).from_config(SD_CONFIG, timestep_spacing=spacing)
        built.set_timesteps(20)
        got = np.asarray(built.sigmas, dtype=np.float64)
        if len(got) == 40:
            got = np.append(got[0::2], got[-1])
        assert np.max(np.abs(got - comfy_sigmas(scheduler, 20)) / comfy_sigmas(scheduler, 20).clip(1e-3)) > 1e-3


def test_unknown_and_refused_nodes_are_refused_naming_them():
    graph = workflow("txt2img")
    graph["20"] = {"class_type": "FancyUpscaler", "inputs": {}}
    assert "node '20' ('FancyUpscaler'): class_type 'FancyUpscaler' is not supported" in refused(graph)
    graph["20"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {}}
    assert "node '20' (ControlNetApplyAdvanced): missing input 'positive'" in refused(graph)
    graph["20"] = {"class_type": "Canny", "inputs": {"image": ["4", 0], "low_threshold": 0.4, "high_threshold": 0.8}}
    assert "node '20' (Canny): ComfyUI's Canny node (kornia" in refused(graph)


def test_cycles_missing_inputs_dangling_links_and_wrong_outputs_are_refused():
    graph = edited("hires", "10", samples=["11", 0])  # the second sampler feeds its own latent
    assert "workflow: node '10' (LatentUpscaleBy): is part of a cycle" in refused(graph)
    graph = workflow("txt2img")
    del graph["3"]["inputs"]["cfg"]
    assert "workflow: node '3' (KSampler): missing input 'cfg'" in refused(graph)
    assert "node '8' (VAEDecode): input 'samples' links to node '99', which is not in the workflow" in refused(
        edited("txt2img", "8", samples=["99", 0]))
    assert "node '8' (VAEDecode): input 'vae' links to output 5 of node '4' (CheckpointLoaderSimple), which has " \
           "outputs 0 to 2" in refused(edited("txt2img", "8", vae=["4", 5]))
    assert "node '8' (VAEDecode): input 'vae' needs a VAE but output 1 of node '4' (CheckpointLoaderSimple) is a " \
           "CLIP" in refused(edited("txt2img", "8", vae=["4", 1]))
    assert "node '5' (EmptyLatentImage): input 'width' must be a int" in refused(edited("txt2img", "5", width="x"))
    assert "no output node" in refused({k: v for k, v in workflow("txt2img").items() if k != "9"})
    assert "nodes; at most 200" in refused({str(i): {"class_type": "PreviewImage", "inputs": {}} for i in range(201)})


def test_what_the_engine_cannot_do_is_refused():
    assert "denoise below 1 (or a start_at_step) on an EmptyLatentImage is not supported" in refused(
        edited("txt2img", "3", denoise=0.5))
    assert "partial ranges are not supported" in refused(edited("lora_chain", "3", end_at_step=1))
    assert "seed 18446744073709551615 is outside" in refused(edited("txt2img", "3", seed=2**64 - 1))
    assert "<lora:...> tags are not ComfyUI syntax" in refused(edited("txt2img", "6", text="a <lora:tiny-style:1>"))
    assert "upscale_method 'bislerp' is not supported" in refused(edited("hires", "10", upscale_method="bislerp"))
    assert "runs with the first pass's seed" in refused(edited("hires", "11", seed=9))
    message = refused(workflow("img2img"))
    assert "node '2' (LoadImage): image 'init.png' is not among the job's images (named: none)" in message
    assert "grow_mask_by must be 0" in refused({**workflow("txt2img"), "20": {
        "class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["22", 0], "vae": ["4", 2], "mask": ["21", 0],
                                                        "grow_mask_by": 6}},
        "21": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}},
        "22": {"class_type": "LoadImage", "inputs": {"image": "i.png"}},
        "3": {**workflow("txt2img")["3"], "inputs": {**workflow("txt2img")["3"]["inputs"], "latent_image": ["20", 0],
                                                     "denoise": 1.0}}})
    graph = copy.deepcopy(workflow("inpaint"))
    graph["5"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["2", 0], "vae": ["1", 2],
                                                                  "mask": ["3", 0], "grow_mask_by": 0}}
    assert "node '8' (KSampler): a VAEEncodeForInpaint latent needs denoise 1" in refused(graph)
    graph["8"]["inputs"]["denoise"] = 1.0
    assert "not among the job's images" in refused(graph)  # past the node checks, to the images
    assert "input: unknown field 'prompt' next to workflow and images" in str(pytest.raises(
        InvalidRequest, comfy_jobs.translate, {"workflow": workflow("txt2img"), "prompt": "x"}).value)


@pytest.mark.parametrize(("url", "expected"), [
    ("file:///etc/passwd", "file:// URLs are not accepted"),
    ("https://user:pw@169.254.169.254/latest", "URLs with credentials (user:password@) are not accepted"),
    ("http://127.0.0.1:1/x.png?token=secret", "use https://"),
])
def test_image_urls_go_through_the_url_policy(url, expected):
    with pytest.raises(InvalidRequest) as info:
        comfy_jobs.translate({"workflow": workflow("img2img"), "images": [{"name": "init.png", "image": url}]})
    assert str(info.value).startswith("images.'init.png': ") and expected in str(info.value)
    assert "secret" not in str(info.value) and "pw" not in str(info.value)


def test_the_images_list_is_bounded_and_well_formed():
    entry = {"name": "a.png", "image": "x"}
    assert "at most 8" in refused(workflow("txt2img"), [entry] * 9)
    assert "duplicate name 'a.png'" in refused(workflow("txt2img"), [entry, entry])
    assert "images[0]: expected" in refused(workflow("txt2img"), [{"name": "a.png"}])


# --- ControlNet and SDXL encoder nodes (sd_core/comfy_conditioning.py) -----------------------------------------------
def png(size=(64, 64), colour=(10, 200, 30)) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EDGES = [{"name": "edges.png", "image": png()}]


def test_controlnet_apply_advanced_becomes_a_native_unit():
    [output] = comfy_jobs.translate({"workflow": workflow("controlnet"), "images": EDGES})
    assert [n.id for n in output.controls] == ["12"]
    request = output.request.model_dump(exclude_defaults=True)
    assert request.pop("controlnets") == [{"model": "tiny-control-a", "image": EDGES[0]["image"], "scale": 0.8}]
    assert request == {"prompt": "a fox on a rock", "negative_prompt": "blurry", "model": "tiny-sd15", "width": 64,
                       "height": 64, "num_inference_steps": 2, "guidance_scale": 7.0, "scheduler": "Euler Normal",
                       "seed": 5}


def chained() -> dict:
    """The ControlNet graph with a second ControlNetApplyAdvanced (DiffControlNetLoader, tiny-control-b) after it."""
    graph = copy.deepcopy(workflow("controlnet"))
    graph["14"] = {"class_type": "DiffControlNetLoader", "inputs": {"model": ["4", 0],
                                                                    "control_net_name": "sd15/tiny-control-b.pth"}}
    graph["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["13", 0], "negative": ["13", 1], "control_net": ["14", 0], "image": ["11", 0], "strength": 1.5,
        "start_percent": 0, "end_percent": 1}}
    graph["3"]["inputs"].update(positive=["15", 0], negative=["15", 1])
    return graph


def test_chained_applies_are_several_units_in_comfyuis_order():
    [output] = comfy_jobs.translate({"workflow": chained(), "images": EDGES})
    assert [(u.model, u.scale) for u in output.request.controlnets] == [("tiny-control-a", 0.8),
                                                                        ("tiny-control-b", 1.5)]
    assert [n.id for n in output.controls] == ["12", "14"]
    assert all((u.start, u.end, u.mode, u.preprocessor, u.resize_mode) == (0, 1, "balanced", "none", "just_resize")
               for u in output.request.controlnets)
    graph = chained()
    graph["15"]["inputs"]["strength"] = 0  # ComfyUI leaves the conditioning unchanged
    [output] = comfy_jobs.translate({"workflow": graph, "images": EDGES})
    assert [u.model for u in output.request.controlnets] == ["tiny-control-a"]


def positive_only(cfg: float) -> dict:
    """ComfyUI's old ControlNetApply: on the positive conditioning only."""
    graph = copy.deepcopy(workflow("controlnet"))
    graph["13"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["12", 0],
                                                               "image": ["11", 0], "strength": 0.8}}
    graph["3"]["inputs"].update(positive=["13", 0], negative=["7", 0], cfg=cfg)
    return graph


def test_positive_only_controlnets_are_exact_only_at_cfg_1():
    message = refused(positive_only(7.0), EDGES)
    assert "node '13' (ControlNetApply): it steers only the positive prompt of node '3' (KSampler)" in message
    assert "use a ControlNetApplyAdvanced wired to both" in message
    [output] = comfy_jobs.translate({"workflow": positive_only(1.0), "images": EDGES})
    assert [(u.model, u.scale) for u in output.request.controlnets] == [("tiny-control-a", 0.8)]
    assert output.request.guidance_scale == 1  # diffusers, as ComfyUI, then runs no negative prompt
    graph = copy.deepcopy(workflow("controlnet"))
    graph["3"]["inputs"]["negative"] = ["7", 0]  # the advanced apply's negative output left unused
    assert "node '13' (ControlNetApplyAdvanced): it steers only the positive prompt" in refused(graph, EDGES)


def test_controlnet_settings_without_an_exact_equivalent_are_refused():
    def with_apply(**inputs):
        graph = copy.deepcopy(workflow("controlnet"))
        graph["13"]["inputs"].update(inputs)
        return graph

    assert "node '13' (ControlNetApplyAdvanced): start_percent and end_percent must be 0 <= start <= end <= 1" in \
        refused(with_apply(start_percent=0.6, end_percent=0.5), EDGES)
    assert "node '13' (ControlNetApplyAdvanced): strength must be 0 to 2.0" in refused(with_apply(strength=3), EDGES)
    message = refused(workflow("controlnet"), [{"name": "edges.png", "image": png((32, 64))}])
    assert "node '13' (ControlNetApplyAdvanced): the control image is 32x64 but the sampler makes 64x64" in message
    scaled = with_apply(image=["20", 0]) | {"20": {"class_type": "ImageScale", "inputs": {
        "image": ["11", 0], "upscale_method": "nearest-exact", "width": 64, "height": 64, "crop": "disabled"}}}
    assert "node '13' (ControlNetApplyAdvanced): its image must come from a LoadImage (the control map itself" in \
        refused(scaled, EDGES)
    graph = with_apply()
    graph["13"]["inputs"]["vae"] = ["4", 1]
    assert "input 'vae' needs a VAE but output 1 of node '4'" in refused(graph, EDGES)
    assert "node '3' (KSampler): cfg 0.5 is not supported" in refused(edited("txt2img", "3", cfg=0.5))


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_comfyuis_schedules_as_the_translation_computes_them(scheduler, steps):
    np.testing.assert_allclose(comfy_samplers.sigmas(scheduler, steps), comfy_sigmas(scheduler, steps), rtol=1e-12)


@pytest.mark.parametrize(("sampler", "denoise", "start", "end", "expected"), [
    # euler + normal, 4 steps: the steps' timesteps are 999, 666, 333, 0; a percent p is the noise at 999 (1 - p)
    (("euler", "normal"), 1.0, 0.5, 1.0, (0.5, 1.0)),  # 499.5: the steps at 333 and 0
    (("euler", "normal"), 1.0, 0.0, 0.4, (0.0, 0.5)),  # 599.4: the steps at 999 and 666
    (("euler", "normal"), 1.0, 0.2, 0.8, (0.25, 0.75)),  # 799.2 to 199.8: the step at 666 and 333
    (("euler", "normal"), 1.0, 0.9, 0.95, None),  # 99.9 to 49.95: no step there, no unit
    # denoise 0.5: the last 4 steps of an 8-step schedule (timesteps 428.1, 285.4, 142.7, 0)
    (("euler", "normal"), 0.5, 0.5, 1.0, (0.0, 1.0)),
    (("euler", "normal"), 0.5, 0.6, 1.0, (0.25, 1.0)),  # 399.6
    # karras sigmas 14.61, 3.0, 0.37, 0.029: 0.5 is sigma 0.97 (timestep 499.5)
    (("dpmpp_2m", "karras"), 1.0, 0.5, 1.0, (0.5, 1.0)),
])
def test_controlnet_percents_become_the_step_window_steering_the_same_steps(sampler, denoise, start, end, expected):
    graph = copy.deepcopy(workflow("controlnet"))
    graph["13"]["inputs"].update(start_percent=start, end_percent=end)
    graph["3"]["inputs"].update(steps=4, denoise=denoise, sampler_name=sampler[0], scheduler=sampler[1])
    if denoise < 1:
        graph["2"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
        graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["4", 2]}}
    [output] = comfy_jobs.translate({"workflow": graph, "images": EDGES})
    units = output.request.controlnets
    assert [(u.start, u.end) for u in units] == ([expected] if expected else [])
    if units:  # diffusers' own rule (control_guidance_start/end -> controlnet_keep) runs exactly the active steps
        run = 4
        keep = [not (i / run < units[0].start or (i + 1) / run > units[0].end) for i in range(run)]
        levels = comfy_samplers.sigmas(sampler[1], int(4 / denoise))[-(run + 1):-1]
        high, low = comfy_samplers.percent_to_sigma(start), comfy_samplers.percent_to_sigma(end)
        assert keep == [low <= level <= high for level in levels]


def test_a_controlnet_percent_on_a_steps_noise_level_is_refused():
    graph = copy.deepcopy(workflow("controlnet"))
    graph["13"]["inputs"].update(start_percent=1 / 3)  # timestep 666: the second of 4 normal steps
    graph["3"]["inputs"]["steps"] = 4
    assert "node '13' (ControlNetApplyAdvanced): start_percent 0.333" in refused(graph, EDGES)
    assert "too close to tell" in refused(graph, EDGES)


def test_controlnets_in_a_hires_workflow_are_refused():
    graph = copy.deepcopy(workflow("hires"))
    first = next(k for k, n in graph.items() if n["class_type"] == "KSampler" and graph[k]["inputs"]["denoise"] == 1)
    positive, negative = graph[first]["inputs"]["positive"], graph[first]["inputs"]["negative"]
    graph.update({
        "31": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
        "32": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny-control-a"}},
        "33": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": ["32", 0], "image": ["31", 0], "strength": 1,
            "start_percent": 0, "end_percent": 1}}})
    graph[first]["inputs"].update(positive=["33", 0], negative=["33", 1])
    assert "ControlNets in a two-pass (hires) workflow are not supported" in refused(graph, EDGES)


def sdxl_encoder(node: dict, size=64, **inputs) -> dict:
    text = node["inputs"]["text"]
    return {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": node["inputs"]["clip"], "width": size, "height": size, "crop_w": 0, "crop_h": 0,
        "target_width": size, "target_height": size, "text_g": text, "text_l": text, **inputs}}


def test_sdxl_text_encoder_at_the_default_size_conditioning_is_the_plain_prompt():
    graph = workflow("txt2img")
    expected = comfy_jobs.translate({"workflow": graph})[0].request
    graph["6"], graph["7"] = sdxl_encoder(graph["6"]), sdxl_encoder(graph["7"])
    assert comfy_jobs.translate({"workflow": graph})[0].request == expected
    graph = workflow("hires")  # each pass's size conditioning is the size it samples at: 64, then 128
    expected = comfy_jobs.translate({"workflow": graph})[0].request
    graph["6"] = sdxl_encoder(graph["6"])
    assert "node '6' (CLIPTextEncodeSDXL): width 64 is not supported (expected 128)" in refused(graph)
    graph["16"], graph["17"] = sdxl_encoder(workflow("hires")["6"], 128), sdxl_encoder(graph["7"], 128)
    graph["7"] = sdxl_encoder(graph["7"])
    graph["11"]["inputs"].update(positive=["16", 0], negative=["17", 0])
    assert comfy_jobs.translate({"workflow": graph})[0].request == expected


@pytest.mark.parametrize(("inputs", "expected"), [
    ({"width": 1024, "height": 1024}, "node '6' (CLIPTextEncodeSDXL): width 1024 is not supported (expected 64)"),
    ({"crop_h": 8}, "node '6' (CLIPTextEncodeSDXL): crop_h 8 is not supported (expected 0)"),
    ({"target_width": 128}, "target_width 128 is not supported (expected 64)"),
    ({"text_l": "a fox"}, "node '6' (CLIPTextEncodeSDXL): text_g and text_l differ"),
])
def test_sdxl_text_encoder_values_without_a_request_field_are_refused(inputs, expected):
    graph = workflow("txt2img")
    graph["6"] = sdxl_encoder(graph["6"], **inputs)
    assert expected in refused(graph)


def test_sdxl_refiner_encoder_is_refused_naming_it():
    graph = workflow("txt2img")
    graph["6"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
        "clip": ["4", 1], "ascore": 6.0, "width": 64, "height": 64, "text": "a fox"}}
    assert "node '6' (CLIPTextEncodeSDXLRefiner): SDXL refiner checkpoints do not run" in refused(graph)
