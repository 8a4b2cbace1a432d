"""ComfyUI's schedulers without an A1111 twin (simple, ddim_uniform, beta, kl_optimal, linear_quadratic) on SD 1.x /
SDXL: the translation gives Euler ComfyUI's own sigmas (sd_core/comfy_schedules.py), recomputed here independently."""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core import comfy_jobs, comfy_samplers
from sd_core.errors import InvalidRequest
from sd_core.schema import GenerationRequest

DATA = Path(__file__).resolve().parents[1] / "data" / "comfy"
NEW = ("simple", "ddim_uniform", "beta", "kl_optimal", "linear_quadratic")


def graph(name: str = "txt2img", node: str = "3", **inputs) -> dict:
    workflow = json.loads((DATA / f"{name}.json").read_text())
    workflow[node]["inputs"].update(inputs)
    return workflow


def init_image() -> list[dict]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, format="PNG")
    return [{"name": "init.png", "image": base64.b64encode(buffer.getvalue()).decode()}]


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))


def comfy_sd_sigmas(scheduler: str, steps: int) -> list[float]:
    """ComfyUI's comfy/samplers.py schedulers on ModelSamplingDiscrete (SD's scaled-linear betas, 1000 sigmas
    ascending), written from their definitions with numpy; the final 0 included."""
    from scipy.stats import beta

    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1 - betas)
    table = ((1 - cumprod) / cumprod) ** 0.5
    low, high = table[0], table[-1]
    if scheduler == "simple":  # every 1000/steps-th sigma from the top, the index truncated
        every = len(table) / steps
        out = [table[-(1 + int(x * every))] for x in range(steps)]
    elif scheduler == "ddim_uniform":  # sigmas[1], sigmas[1 + 1000 // steps], ... below 1000, reversed
        out = list(table[1::len(table) // steps][::-1])
    elif scheduler == "beta":  # whole timesteps at beta(0.6, 0.6) quantiles, repeats dropped
        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999).astype(int)
        out = [table[t] for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    elif scheduler == "kl_optimal":  # tan of atan(sigma_max) .. atan(sigma_min) evenly spaced
        w = np.arange(steps) / (steps - 1)
        out = list(np.tan(w * np.arctan(low) + (1 - w) * np.arctan(high)))
    else:  # linear_quadratic (Mochi): 1 - (linear to 0.025 over steps // 2, then quadratic to 1), times sigma_max
        half = steps // 2
        diff = half - 0.025 * steps
        a, b = diff / (half * (steps - half) ** 2), 0.025 / half - 2 * diff / (steps - half) ** 2
        ts = [i * 0.025 / half for i in range(half)] + [a * i * i + b * i + a * half * half for i in range(half, steps)]
        out = list((1 - np.asarray(ts)) * high)
    return [float(s) for s in out] + [0.0]


@pytest.mark.parametrize("steps", [2, 5, 7, 20, 33])
@pytest.mark.parametrize("scheduler", NEW)
def test_the_translation_gives_euler_comfyuis_sigmas(scheduler, steps):
    [output] = comfy_jobs.translate({"workflow": graph(scheduler=scheduler, steps=steps)})
    request = output.request
    expected = comfy_sd_sigmas(scheduler, steps)
    assert request.scheduler == "Euler" and request.num_inference_steps == len(expected) - 1
    np.testing.assert_allclose(request.sigmas + [0.0], expected, rtol=1e-9)
    ddim = comfy_jobs.translate({"workflow": graph(sampler_name="ddim", scheduler=scheduler, steps=steps)})[0]
    assert ddim.request == request  # ComfyUI's ddim is its Euler sampler


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("scheduler", NEW)
def test_the_pipeline_runs_comfyuis_sigmas(engine, scheduler, steps):
    [output] = comfy_jobs.translate({"workflow": graph(scheduler=scheduler, steps=steps) | {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}})
    engine.generate(output.request)
    used = engine.pool.get("tiny-sd15").scheduler("Euler", steps, sigmas=True).sigmas.tolist()
    np.testing.assert_allclose(used, comfy_sd_sigmas(scheduler, steps), rtol=1e-6)


def test_a_graph_equals_the_native_request_with_comfyuis_sigmas(engine):
    workflow = graph(scheduler="beta", steps=3)
    workflow["5"]["inputs"]["batch_size"] = 1
    [output] = comfy_jobs.translate({"workflow": workflow})
    native = GenerationRequest(prompt="a red fox in the snow", negative_prompt="blurry", model="tiny-sd15", seed=42,
                               width=64, height=64, guidance_scale=7.5, sigmas=comfy_sd_sigmas("beta", 3)[:-1])
    ran, expected = engine.generate(output.request), engine.generate(native)
    assert np.array_equal(pixels(ran), pixels(expected)) and "Sampler: Euler," in ran.parameters
    other = engine.generate(native.model_copy(update={"sigmas": comfy_sd_sigmas("simple", 3)[:-1]}))
    assert not np.array_equal(pixels(other), pixels(expected))  # the sigmas matter


def test_a_partial_denoise_runs_the_last_sigmas_of_comfyuis_longer_schedule():
    # steps 2, denoise 0.5: ComfyUI runs the last 2 of a 4-step schedule; diffusers' strength 0.5 of those 4 sigmas
    workflow = graph("img2img", "6", sampler_name="euler", scheduler="kl_optimal", steps=2, denoise=0.5)
    [output] = comfy_jobs.translate({"workflow": workflow, "images": init_image()})
    request = output.request
    np.testing.assert_allclose(request.sigmas + [0.0], comfy_sd_sigmas("kl_optimal", 4), rtol=1e-9)
    assert request.num_inference_steps == 4 and int(4 * request.strength) == 2


def refused(workflow: dict, images=None) -> str:
    with pytest.raises(InvalidRequest) as info:
        comfy_jobs.translate({"workflow": workflow, **({"images": images} if images else {})})
    return str(info.value)


def test_what_the_sigmas_cannot_run_is_refused_naming_the_node():
    assert "node '3' (KSampler): scheduler 'kl_optimal' needs at least 2 steps" in refused(
        graph(scheduler="kl_optimal", steps=1))
    # ddim_uniform at 12 steps spaces by 1000 // 12 = 83: 13 sigmas, so a partial run's last 6 are not diffusers'
    assert "node '6' (KSampler): scheduler 'ddim_uniform' gives 13 steps for 12: a partial run" in refused(
        graph("img2img", "6", sampler_name="euler", scheduler="ddim_uniform", steps=6, denoise=0.5), init_image())
    hires = json.loads((DATA / "hires.json").read_text())
    second = copy.deepcopy(hires)
    second["11"]["inputs"].update(sampler_name="euler", scheduler="simple")
    assert "node '11' (KSampler): a two-pass (hires) workflow runs the hires fix's own schedules" in refused(second)
    first = copy.deepcopy(hires)
    first["3"]["inputs"].update(sampler_name="euler", scheduler="beta")
    assert "a two-pass (hires) workflow runs the hires fix's own schedules" in refused(first)
    assert "sampler_name 'heun' and scheduler 'simple' has no exact equivalent" in refused(
        graph(sampler_name="heun", scheduler="simple"))


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform"])
def test_the_a1111_twins_keep_their_engine_schedules(scheduler):
    [output] = comfy_jobs.translate({"workflow": graph(scheduler=scheduler, steps=4)})
    assert output.request.sigmas is None and output.request.scheduler.startswith("Euler ")
    # comfy_samplers.sigmas (ControlNet windows) computes every scheduler, sgm_uniform included
    assert len(comfy_samplers.sigmas(scheduler, 4)) == 5
