"""ComfyUI FLUX graphs (sd_core/comfy_flux.py): ComfyUI's flow schedules against diffusers' FLUX Euler, the
translation to one FLUX request, and the refusals naming the node (no engine: the checks before any GPU work)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_core import comfy_jobs, comfy_samplers
from sd_core.errors import InvalidRequest

DATA = Path(__file__).resolve().parents[1] / "data" / "comfy"
# black-forest-labs' scheduler_config.json of FLUX.1-dev and FLUX.1-schnell
DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
           base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL = {**DEV, "shift": 1.0, "use_dynamic_shifting": False}


def workflow(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def translate(graph: dict, catalog=None):
    return comfy_jobs.translate({"workflow": graph}, catalog=catalog)


def refused(graph: dict, config=DEV, guidance_embeds=True) -> str:
    with pytest.raises(InvalidRequest) as info:
        for output in translate(graph):
            output.check(config, guidance_embeds)
    message = str(info.value)
    assert message.startswith("workflow: ") and "Traceback" not in message
    return message


def comfy_simple(steps: int, mu: float | None) -> list[float]:
    """ComfyUI's `simple` schedule as its code computes it, in torch float32: the model sampling's table of sigmas
    at t = 1/N .. 1 (ModelSamplingFlux: N 10000, exp(mu) / (exp(mu) + 1/t - 1); schnell's flow: N 1000, t), every
    N/steps-th from the top, then 0."""
    size = 1000 if mu is None else 10000
    t = torch.arange(1, size + 1, 1) / size
    table = t if mu is None else math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    every = len(table) / steps
    return [float(table[-(1 + int(x * every))]) for x in range(steps)] + [0.0]


def diffusers_flux(config: dict, steps: int, width: int, height: int) -> list[float]:
    """The sigmas FluxPipeline runs, computed as FluxPipeline.__call__ does (retrieve_timesteps with its mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift((width // 16) * (height // 16), 256, 4096, 0.5, 1.15)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 8, 20, 25, 50])
def test_comfy_simple_equals_diffusers_flux_euler_when_the_steps_divide_the_table(steps):
    # dev with ModelSamplingFlux at the sampled size (mu from its width/height = diffusers' dynamic mu)
    mu = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)
    assert np.allclose(comfy_simple(steps, mu), diffusers_flux(DEV, steps, 64, 64), atol=1e-6, rtol=0)
    # dev without the node: ComfyUI's mu 1.15 is diffusers' only at 4096 tokens (1024x1024)
    assert np.allclose(comfy_simple(steps, 1.15), diffusers_flux(DEV, steps, 1024, 1024), atol=1e-6, rtol=0)
    # schnell (ComfyUI: unshifted flow, shift 1.0): diffusers' fixed shift 1.0
    assert np.allclose(comfy_simple(steps, None), diffusers_flux(SCHNELL, steps, 64, 64), atol=1e-6, rtol=0)
    # the module's own ComfyUI/diffusers computations agree with these
    assert comfy_samplers.same_sigmas(comfy_samplers.comfy_flow_sigmas("simple", steps, mu),
                                      comfy_samplers.diffusers_flux_sigmas(DEV, steps, 64, 64))


@pytest.mark.parametrize("steps", [3, 6, 28])
def test_comfy_simple_differs_when_the_steps_do_not_divide_the_table(steps):
    # int(x * N / steps) truncates: t lands up to 1/N below diffusers' 1 - x/steps
    assert not np.allclose(comfy_simple(steps, None), diffusers_flux(SCHNELL, steps, 64, 64), atol=1e-6, rtol=0)
    assert not comfy_samplers.same_sigmas(comfy_samplers.comfy_flow_sigmas("simple", steps, None),
                                          comfy_samplers.diffusers_flux_sigmas(SCHNELL, steps, 64, 64))
    mu = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)
    assert not comfy_samplers.same_sigmas(comfy_samplers.comfy_flow_sigmas("simple", steps, mu),
                                          comfy_samplers.diffusers_flux_sigmas(DEV, steps, 64, 64))


@pytest.mark.parametrize("scheduler", ["normal", "sgm_uniform"])
def test_comfy_normal_and_sgm_uniform_are_not_diffusers_flux_euler(scheduler):
    mu = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)
    for steps in (4, 20):
        assert not comfy_samplers.same_sigmas(comfy_samplers.comfy_flow_sigmas(scheduler, steps, mu),
                                              comfy_samplers.diffusers_flux_sigmas(DEV, steps, 64, 64))


def test_flux_dev_workflow_translates_to_one_flux_request():
    [output] = translate(workflow("flux_dev"))
    assert output.request.model_dump(exclude_defaults=True) == {
        "prompt": "a red fox in the snow", "model": "tiny-flux-dev", "width": 64, "height": 64,
        "num_inference_steps": 4, "guidance_scale": 5.0, "scheduler": "Euler", "seed": 42}
    output.check(DEV, True)  # ModelSamplingFlux at 64x64 = the dev config's dynamic shift at 64x64


def test_flux_checkpoint_workflow_ignores_the_negative_at_cfg_1():
    [output] = translate(workflow("flux_checkpoint"))
    request = output.request
    assert (request.model, request.prompt, request.negative_prompt, request.guidance_scale, request.num_outputs,
            request.seed) == ("tiny-flux-dev", "a snowy mountain cabin", "", 2.5, 2, 7)
    graph = workflow("flux_checkpoint")
    graph["6"] = {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["4", 1], "clip_l": "a cabin",
                                                                 "t5xxl": "a cabin", "guidance": 9.0}}
    graph["3"]["inputs"]["positive"] = ["6", 0]  # no FluxGuidance: the encoder's guidance
    [output] = translate(graph)
    assert (output.request.prompt, output.request.guidance_scale) == ("a cabin", 9.0)
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a cabin"}}
    [output] = translate(graph)
    assert output.request.guidance_scale == 3.5  # ComfyUI's FLUX default guidance


def test_the_catalog_tells_flux_checkpoints_and_models_apart(engine):
    graph = workflow("flux_checkpoint")
    graph["4"]["inputs"]["ckpt_name"] = "tiny-flux.safetensors"
    graph["3"]["inputs"]["model"] = ["4", 0]
    del graph["30"], graph["35"]
    graph["3"]["inputs"]["positive"] = ["6", 0]
    # only KSampler, CLIPTextEncode, EmptySD3LatentImage: FLUX because the catalog says so
    [output] = translate(graph, engine.catalog)
    assert output.request.model == "tiny-flux" and output.check is not None
    dev = workflow("flux_dev")
    dev["12"]["inputs"]["unet_name"] = "tiny-sd15.safetensors"
    with pytest.raises(InvalidRequest, match=r"node '12' \(UNETLoader\): unet_name 'tiny-sd15.safetensors' is a sd15 "
                                             r"model, not a FLUX model"):
        translate(dev, engine.catalog)


def edit(name: str, node: str, **inputs) -> dict:
    graph = copy.deepcopy(workflow(name))
    graph[node]["inputs"].update(inputs)
    return graph


@pytest.mark.parametrize(("graph", "expected"), [
    (edit("flux_checkpoint", "3", cfg=3.5), "node '3' (KSampler): cfg 3.5 on a FLUX model is true classifier-free"),
    (edit("flux_dev", "12", weight_dtype="fp8_e4m3fn"), "node '12' (UNETLoader): weight_dtype 'fp8_e4m3fn' is not"),
    (edit("flux_dev", "11", clip_name1="t5xxl_fp8_e4m3fn.safetensors"),
     "node '11' (DualCLIPLoader): clip_name1/clip_name2 must be clip_l.safetensors and t5xxl_fp16.safetensors"),
    (edit("flux_dev", "11", type="sd3"), "node '11' (DualCLIPLoader): type 'sd3' is not supported"),
    (edit("flux_dev", "10", vae_name="sdxl_vae.safetensors"), "node '8' (VAEDecode): its vae must be a VAELoader"),
    (edit("flux_dev", "16", sampler_name="dpmpp_2m"), "node '16' (KSamplerSelect): sampler_name 'dpmpp_2m' does not"),
    (edit("flux_dev", "17", scheduler="beta"), "node '17' (BasicScheduler): scheduler 'beta' has no exact"),
    (edit("flux_dev", "17", scheduler="normal"), "node '17' (BasicScheduler): scheduler 'normal' at 4 steps"),
    (edit("flux_dev", "17", steps=3), "node '17' (BasicScheduler): scheduler 'simple' at 3 steps"),
    (edit("flux_dev", "17", denoise=0.5), "node '17' (BasicScheduler): denoise 0.5 is not supported"),
    (edit("flux_dev", "30", width=1024, height=1024), "node '17' (BasicScheduler): scheduler 'simple' at 4 steps and "
                                                      "64x64 gives other sigmas in ComfyUI (node '30'"),
    (edit("flux_dev", "27", width=72), "node '27' (EmptySD3LatentImage): 72x64: FLUX samples sizes in multiples"),
    (edit("flux_dev", "6", text="a (red:1.3) fox"), "node '6' (CLIPTextEncode): parentheses (ComfyUI's prompt"),
    (edit("flux_dev", "6", text="a fox <lora:x:1>"), "node '6' (CLIPTextEncode): <lora:...> tags are not"),
    (edit("flux_dev", "25", noise_seed=-1), "node '25' (RandomNoise): seed -1 is outside"),
])
def test_flux_refusals_name_the_node(graph, expected):
    assert expected in refused(graph)


def test_flux_refusals_of_wiring():
    graph = workflow("flux_dev")
    graph["6"] = {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["11", 0], "clip_l": "a fox",
                                                                 "t5xxl": "a red fox", "guidance": 3.5}}
    assert "node '6' (CLIPTextEncodeFlux): clip_l and t5xxl differ" in refused(graph)
    graph = workflow("flux_dev")
    graph["31"] = {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 64,
                                                                 "height": 64, "model": ["12", 0]}}
    graph["17"]["inputs"]["model"] = ["31", 0]
    assert "node '17' (BasicScheduler): its model must be the one of node '22' (BasicGuider)" in refused(graph)
    graph = workflow("flux_dev")
    graph["8"]["inputs"]["samples"] = ["13", 1]
    assert "node '8' (VAEDecode): its samples must be output 0 of node '13'" in refused(graph)
    graph = workflow("flux_checkpoint")  # no ModelSamplingFlux: ComfyUI's dev default mu 1.15, not 64x64's shift
    graph["3"]["inputs"]["model"] = ["4", 0]
    del graph["30"]
    assert "node '3' (KSampler): scheduler 'simple' at 4 steps and 64x64 gives other sigmas in ComfyUI (ComfyUI's " \
           "default for this model)" in refused(graph)
    # a schnell model (no guidance embedding): ComfyUI's unshifted flow = diffusers' fixed shift 1.0
    for output in translate(graph):
        output.check(SCHNELL, False)
