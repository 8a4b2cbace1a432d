"""ComfyUI SD3 / SD3.5 graphs (sd_core/comfy_sd3.py): ComfyUI's SD3 flow schedules against diffusers' SD3 Euler, the
translation to one SD3 request, and the refusals naming the node (no engine: the checks before any GPU work)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_core import comfy_jobs, comfy_samplers
from sd_core.comfy_graph import parse_workflow
from sd_core.comfy_nodes import Translator
from sd_core.errors import InvalidRequest

DATA = Path(__file__).resolve().parents[1] / "data" / "comfy"
# stabilityai/stable-diffusion-3.5-large's (and -medium's, SD3's) scheduler_config.json
SD35 = {"num_train_timesteps": 1000, "shift": 3.0}


def workflow() -> dict:
    return json.loads((DATA / "sd3.json").read_text())


def family(name: str) -> str | None:
    """The catalog's families (comfy_jobs.translate's catalog lookup) for the names these graphs use."""
    return {"tiny-sd3": "sd3", "tiny-sd15": "sd15", "tiny-flux-dev": "flux"}.get(name)


def translate(graph: dict, families=family):
    return Translator(parse_workflow(graph), None, family=families).outputs()


def refused(graph: dict) -> str:
    with pytest.raises(InvalidRequest) as info:
        translate(graph)
    message = str(info.value)
    assert message.startswith("workflow: ") and "Traceback" not in message
    return message


def comfy_sd3_sigmas(scheduler: str, steps: int, shift: float) -> list[float]:
    """ComfyUI's schedule for an SD3 model as its code computes it, in torch float32: ModelSamplingDiscreteFlow's
    table sigma(t) = shift t / (1 + (shift - 1) t) at t = 1/1000 .. 1 (multiplier 1000), then the `normal` scheduler
    (timesteps evenly spaced from timestep(sigma_max) to timestep(sigma_min), back through sigma(), then 0) or
    `simple` (every 1000/steps-th table entry from the top, then 0)."""
    def sigma(timestep):
        t = timestep / 1000.0
        return shift * t / (1 + (shift - 1) * t)

    table = sigma(torch.arange(1, 1001, 1, dtype=torch.float32))
    if scheduler == "simple":
        every = len(table) / steps
        return [float(table[-(1 + int(x * every))]) for x in range(steps)] + [0.0]
    start, end = float(table[-1]) * 1000, float(table[0]) * 1000  # timestep(sigma) = sigma * multiplier
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if scheduler == "sgm_uniform" else (
        torch.linspace(start, end, steps))
    return [float(sigma(t)) for t in timesteps] + [0.0]


def diffusers_sd3(config: dict, steps: int) -> list[float]:
    """The sigmas StableDiffusion3Pipeline runs, computed as its __call__ does (retrieve_timesteps, no sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    retrieve_timesteps(scheduler, steps, "cpu")
    return scheduler.sigmas.tolist()


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and np.allclose(a, b, atol=2e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20, 28, 40])
def test_comfy_normal_equals_diffusers_sd3_euler_at_the_models_shift(steps):
    expected = diffusers_sd3(SD35, steps)
    assert same(comfy_sd3_sigmas("normal", steps, 3.0), expected)
    # the request's sigmas agree with these
    assert same(comfy_samplers.flow_schedule(None, "normal", steps, None, 3.0) + [0.0], expected)
    # another shift is another schedule
    assert not same(comfy_sd3_sigmas("normal", steps, 2.0), expected) or steps == 1


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 28])
@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_the_request_sigmas_are_comfyuis_simple_normal_and_sgm_uniform(steps, shift):
    for scheduler in ("simple", "normal", "sgm_uniform"):
        sigmas = comfy_samplers.flow_schedule(None, scheduler, steps, None, shift) + [0.0]
        assert same(sigmas, comfy_sd3_sigmas(scheduler, steps, shift))
        if scheduler != "normal":  # not diffusers' default: what explicit sigmas are for
            assert not same(sigmas, diffusers_sd3({**SD35, "shift": shift}, steps))


def test_sd3_workflow_translates_to_one_sd3_request():
    [output] = translate(workflow())
    assert output.request.model_dump(exclude_defaults=True) == {
        "prompt": "a red fox in the snow", "negative_prompt": "blurry", "model": "tiny-sd3", "width": 64,
        "height": 64, "num_inference_steps": 3, "guidance_scale": 4.5, "scheduler": "Euler", "seed": 11,
        "max_sequence_length": 77, "sigmas": output.request.sigmas}
    assert same(output.request.sigmas + [0.0], comfy_sd3_sigmas("normal", 3, 3.0))  # ModelSamplingSD3 shift 3.0
    graph = workflow()  # no ModelSamplingSD3: ComfyUI's SD3 default shift 3.0; the checkpoint's own CLIP
    graph["3"]["inputs"]["model"] = ["4", 0]
    graph["16"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cabin", "clip": ["4", 1]}}
    graph["3"]["inputs"]["negative"] = ["40", 0]
    [output] = translate(graph)
    assert (output.request.prompt, output.request.negative_prompt) == ("a cabin", "blurry")
    assert same(output.request.sigmas + [0.0], comfy_sd3_sigmas("normal", 3, 3.0))
    graph["3"]["inputs"]["cfg"] = 1.0  # cfg 1: no guidance, the negative unused (ComfyUI skips it too)
    graph["3"]["inputs"]["negative"] = ["70", 0]
    graph["70"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["40", 0]}}
    [output] = translate(graph)
    assert (output.request.negative_prompt, output.request.guidance_scale) == ("", 1.0)


def test_the_sd35_reference_negative_is_refused_naming_the_zero_out_node():
    graph = workflow()  # SD3.5's reference workflow: the negative zeroed over the last 90% of the schedule
    graph["70"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["40", 0]}}
    graph["68"]["inputs"]["conditioning"] = ["70", 0]
    assert "node '70' (ConditioningZeroOut): zeroed conditioning has no equivalent" in refused(graph)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda g: g["68"]["inputs"].update(start=0.2), "node '3' (KSampler): its negative's ConditioningSetTimestep"),
    (lambda g: g["67"]["inputs"].update(conditioning=["16", 0]), "node '3' (KSampler): its negative combines"),
    (lambda g: g["16"]["inputs"].update(clip_l="a fox"), "node '16' (CLIPTextEncodeSD3): clip_l, clip_g and t5xxl"),
    (lambda g: g["16"]["inputs"].update(clip_l="", clip_g="", t5xxl="", empty_padding="none"),
     "node '16' (CLIPTextEncodeSD3): an empty prompt with empty_padding 'none'"),
    (lambda g: g["16"]["inputs"].update(clip_l="(fox:1.2)", clip_g="(fox:1.2)", t5xxl="(fox:1.2)"),
     "node '16' (CLIPTextEncodeSD3): parentheses"),
    (lambda g: g["11"]["inputs"].update(clip_name3="t5xxl_fp8_e4m3fn.safetensors"),
     "node '11' (TripleCLIPLoader): clip_name1/2/3 must be"),
    (lambda g: g["13"]["inputs"].update(shift=0.0), "node '13' (ModelSamplingSD3): shift 0.0 must be above 0"),
    (lambda g: g["3"]["inputs"].update(scheduler="ddim_uniform"),
     "node '3' (KSampler): scheduler 'ddim_uniform' has no exact equivalent for SD3 here; supported: simple"),
    (lambda g: g["3"]["inputs"].update(sampler_name="dpmpp_2m"), "node '3' (KSampler): sampler_name 'dpmpp_2m'"),
    (lambda g: g["3"]["inputs"].update(cfg=0.5), "node '3' (KSampler): cfg 0.5 is not supported"),
    (lambda g: g["3"]["inputs"].update(denoise=0.5), "node '3' (KSampler): denoise 0.5"),
    (lambda g: g["8"]["inputs"].update(vae=["99", 0]), "node '8' (VAEDecode): its vae must be the VAE output"),
    (lambda g: g["53"]["inputs"].update(width=72), "node '53' (EmptySD3LatentImage): 72x64"),
])
def test_sd3_refusals_name_the_node(change, expected):
    graph = copy.deepcopy(workflow())
    graph["99"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}}
    change(graph)
    assert expected in refused(graph)


@pytest.mark.parametrize(("scheduler", "steps", "shift"), [("simple", 28, 3.0), ("normal", 28, 6.0),
                                                           ("sgm_uniform", 7, 3.0)])
def test_the_pipeline_runs_comfyuis_sigmas_whatever_the_models_shift(engine, scheduler, steps, shift):
    # the tiny SD3's own config shifts by 3.0: ComfyUI's ModelSamplingSD3 shift runs instead, at any step count
    graph = workflow()
    graph["3"]["inputs"].update(scheduler=scheduler, steps=steps)
    graph["13"]["inputs"]["shift"] = shift
    [output] = translate(graph)
    engine.generate(output.request)
    used = engine.pool.get("tiny-sd3").scheduler("Euler", steps, sigmas=True).sigmas.tolist()
    assert same(used, comfy_sd3_sigmas(scheduler, steps, shift))


def test_the_token_check_loads_each_tokenizer_once(tiny_bucket):
    from sd_core import comfy_sd3

    [output] = translate(workflow())
    folder = tiny_bucket / "tiny-sd3" / "diffusers"
    output.tokens(folder, set())
    misses = comfy_sd3._tokenizer.cache_info().misses
    output.tokens(folder, set())
    [output] = translate(workflow())  # another job on the same model
    output.tokens(folder, set())
    assert comfy_sd3._tokenizer.cache_info().misses == misses


def test_sd3_nodes_on_a_non_sd3_checkpoint_are_refused():
    graph = workflow()
    graph["4"]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    assert "node '4' (CheckpointLoaderSimple): ckpt_name 'tiny-sd15.safetensors' is a sd15 model, not an SD3" in (
        refused(graph))


def test_without_a_catalog_sd3_nodes_still_route_to_sd3():
    [output] = comfy_jobs.translate({"workflow": workflow()})  # TripleCLIPLoader, ModelSamplingSD3: SD3 nodes
    assert (output.request.model, output.request.guidance_scale) == ("tiny-sd3", 4.5)
