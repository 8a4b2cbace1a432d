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


def refused(graph: dict, guidance_embeds=True) -> str:
    with pytest.raises(InvalidRequest) as info:
        for output in translate(graph):
            if output.schedule is not None:
                output.schedule(guidance_embeds)
    message = str(info.value)
    assert message.startswith("workflow: ") and "Traceback" not in message
    return message


def comfy_table(mu: float | None, shift: float = 1.0) -> torch.Tensor:
    """ComfyUI's flow sigma table as its code computes it, in torch float32: t = 1/N .. 1, ModelSamplingFlux (N 10000,
    exp(mu) / (exp(mu) + 1/t - 1)) or ModelSamplingDiscreteFlow (N 1000, shift t / (1 + (shift - 1) t))."""
    size = 1000 if mu is None else 10000
    t = torch.arange(1, size + 1, 1) / size
    if mu is None:
        return shift * t / (1 + (shift - 1) * t)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def comfy_simple(steps: int, mu: float | None) -> list[float]:
    """ComfyUI's `simple` schedule: every N/steps-th table entry from the top, then 0."""
    table = comfy_table(mu)
    every = len(table) / steps
    return [float(table[-(1 + int(x * every))]) for x in range(steps)] + [0.0]


def comfy_schedule(scheduler: str, steps: int, mu: float | None, shift: float = 1.0) -> list[float]:
    """ComfyUI's schedulers on a flow table, recomputed here in torch float32 from their definitions (comfy/samplers.py,
    k-diffusion's get_sigmas_karras / get_sigmas_exponential); timestep(sigma) = sigma, sigma(t) = the table's
    function."""
    from scipy.stats import beta

    table = comfy_table(mu, shift)
    if scheduler == "simple":
        every = len(table) / steps
        return [float(table[-(1 + int(x * every))]) for x in range(steps)] + [0.0]
    low, high = float(table[0]), float(table[-1])
    if scheduler == "karras":
        ramp = torch.linspace(0, 1, steps)
        sigmas = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
        return sigmas.tolist() + [0.0]
    if scheduler == "exponential":
        return torch.linspace(math.log(high), math.log(low), steps).exp().tolist() + [0.0]
    if scheduler == "beta":
        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (len(table) - 1))
        picked = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
        return [float(table[i]) for i in picked] + [0.0]
    if scheduler == "kl_optimal":  # tan of atan(sigma_max) .. atan(sigma_min), evenly spaced
        w = torch.arange(steps, dtype=torch.float) / (steps - 1)
        return (w * math.atan(low) + (1 - w) * math.atan(high)).tan().tolist() + [0.0]
    if scheduler == "linear_quadratic":  # Mochi's: 1 - (linear to 0.025 over steps // 2, then quadratic), x sigma_max
        half = steps // 2
        diff = half - 0.025 * steps
        a, b = diff / (half * (steps - half) ** 2), 0.025 / half - 2 * diff / (steps - half) ** 2
        ts = [i * 0.025 / half for i in range(half)] + [a * i * i + b * i + a * half * half for i in range(half, steps)]
        return ((1 - torch.tensor(ts + [1.0])) * high).tolist()

    def sigma(t):
        return shift * t / (1 + (shift - 1) * t) if mu is None else math.exp(mu) / (math.exp(mu) + (1 / t - 1))

    sgm = scheduler == "sgm_uniform"
    times = torch.linspace(high, low, steps + 1)[:-1] if sgm else torch.linspace(high, low, steps)
    return [float(sigma(t)) for t in times] + [0.0]


def diffusers_flux(config: dict, steps: int, width: int, height: int) -> list[float]:
    """The sigmas FluxPipeline runs by default, computed as FluxPipeline.__call__ does (retrieve_timesteps with its
    mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift((width // 16) * (height // 16), 256, 4096, 0.5, 1.15)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.tolist()


SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential")


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 20, 28, 50])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_request_sigmas_are_comfyuis_schedule(scheduler, steps):
    # FLUX dev through ModelSamplingFlux at 64x64, ComfyUI's dev default (mu 1.15), schnell's unshifted flow, SD3's
    # shift 3.0: the sigmas a request gets are ComfyUI's, then diffusers' final 0
    node = None
    for mu, shift in ((comfy_samplers.flux_mu(1.15, 0.5, 64, 64), 1.0), (1.15, 1.0), (None, 1.0), (None, 3.0)):
        sigmas = comfy_samplers.flow_schedule(node, scheduler, steps, mu, shift)
        assert np.allclose(sigmas + [0.0], comfy_schedule(scheduler, steps, mu, shift), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [2, 3, 7, 28])
@pytest.mark.parametrize("scheduler", ["kl_optimal", "linear_quadratic"])
def test_kl_optimal_and_linear_quadratic_are_comfyuis_on_flow_models(scheduler, steps):
    # both read only the table's bounds (sigma_max 1: they start from pure noise, as diffusers' flow pipelines)
    for mu, shift in ((comfy_samplers.flux_mu(1.15, 0.5, 64, 64), 1.0), (1.15, 1.0), (None, 1.0), (None, 3.0)):
        sigmas = comfy_samplers.flow_schedule(None, scheduler, steps, mu, shift)
        assert np.allclose(sigmas + [0.0], comfy_schedule(scheduler, steps, mu, shift), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 8, 20, 25, 50])
def test_comfy_simple_equals_diffusers_flux_euler_when_the_steps_divide_the_table(steps):
    # dev with ModelSamplingFlux at the sampled size (mu from its width/height = diffusers' dynamic mu)
    mu = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)
    assert np.allclose(comfy_simple(steps, mu), diffusers_flux(DEV, steps, 64, 64), atol=1e-6, rtol=0)
    # dev without the node: ComfyUI's mu 1.15 is diffusers' only at 4096 tokens (1024x1024)
    assert np.allclose(comfy_simple(steps, 1.15), diffusers_flux(DEV, steps, 1024, 1024), atol=1e-6, rtol=0)
    # schnell (ComfyUI: unshifted flow, shift 1.0): diffusers' fixed shift 1.0
    assert np.allclose(comfy_simple(steps, None), diffusers_flux(SCHNELL, steps, 64, 64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [3, 6, 28])
def test_comfy_simple_differs_from_diffusers_default_when_the_steps_do_not_divide_the_table(steps):
    # int(x * N / steps) truncates: t lands up to 1/N below diffusers' 1 - x/steps (why explicit sigmas are passed)
    assert not np.allclose(comfy_simple(steps, None), diffusers_flux(SCHNELL, steps, 64, 64), atol=1e-6, rtol=0)
    mu = comfy_samplers.flux_mu(1.15, 0.5, 64, 64)
    assert not np.allclose(comfy_simple(steps, mu), diffusers_flux(DEV, steps, 64, 64), atol=1e-6, rtol=0)


def test_flux_dev_workflow_translates_to_one_flux_request():
    [output] = translate(workflow("flux_dev"))
    sigmas = output.request.sigmas  # ModelSamplingFlux's shift: known from the graph
    assert output.request.model_dump(exclude_defaults=True) == {
        "prompt": "a red fox in the snow", "model": "tiny-flux-dev", "width": 64, "height": 64,
        "num_inference_steps": 4, "guidance_scale": 5.0, "scheduler": "Euler", "sigmas": sigmas, "seed": 42}
    assert output.schedule is None
    assert sigmas + [0.0] == pytest.approx(comfy_simple(4, comfy_samplers.flux_mu(1.15, 0.5, 64, 64)), abs=1e-6)


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
    assert output.request.model == "tiny-flux" and output.schedule is not None
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
    (edit("flux_dev", "17", scheduler="ddim_uniform"), "node '17' (BasicScheduler): scheduler 'ddim_uniform' has no "
                                                       "exact equivalent for FLUX here; supported: simple, normal"),
    (edit("flux_dev", "17", scheduler="kl_optimal", steps=1), "node '17' (BasicScheduler): scheduler 'kl_optimal' "
                                                               "needs at least 2 steps"),
    (edit("flux_dev", "17", steps=151), "node '13' (SamplerCustomAdvanced): num_inference_steps: Input should be"),
    (edit("flux_dev", "17", denoise=0.5), "node '17' (BasicScheduler): denoise 0.5 is not supported"),
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
    graph = workflow("flux_checkpoint")  # no ModelSamplingFlux: ComfyUI's default for the model, known from its files
    graph["3"]["inputs"]["model"] = ["4", 0]
    del graph["30"]
    [output] = translate(graph)
    assert output.request.sigmas is None and output.schedule is not None
    # a dev-like model (guidance embedding): mu 1.15, not 64x64's shift; schnell-like: the unshifted flow
    assert output.schedule(True) + [0.0] == pytest.approx(comfy_simple(4, 1.15), abs=1e-6)
    assert output.schedule(False) + [0.0] == pytest.approx(comfy_simple(4, None), abs=1e-6)
    comfy_jobs.scheduled(output, True)
    assert output.request.sigmas + [0.0] == pytest.approx(comfy_simple(4, 1.15), abs=1e-6)
    assert output.request.num_inference_steps == 4


@pytest.mark.parametrize(("scheduler", "steps"), [("simple", 28), ("simple", 3), ("normal", 7), ("beta", 28),
                                                  ("karras", 5), ("sgm_uniform", 28), ("kl_optimal", 4),
                                                  ("linear_quadratic", 5)])
def test_the_pipeline_runs_comfyuis_sigmas_at_any_step_count(engine, scheduler, steps):
    # ComfyUI's FLUX dev example graph on the tiny dev-like model (dynamic shifting in its scheduler config): the
    # sigmas the FLUX pipeline's scheduler actually ran are ComfyUI's, the config's shift turned off
    graph = edit("flux_dev", "17", scheduler=scheduler, steps=steps)
    [output] = translate(graph, engine.catalog)
    engine.generate(output.request)
    model = engine.pool.get("tiny-flux-dev")
    used = model.scheduler("Euler", output.request.num_inference_steps, sigmas=True).sigmas.tolist()
    assert np.allclose(used, comfy_schedule(scheduler, steps, comfy_samplers.flux_mu(1.15, 0.5, 64, 64)),
                       atol=1e-6, rtol=0)
