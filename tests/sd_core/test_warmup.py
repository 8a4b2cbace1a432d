"""Cold-start warm-up (SD_WARMUP): one tiny generation per preloaded model inside Engine.preload, invisible after."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from sd_core.errors import WorkerUnhealthy
from sd_core.schema import GenerationRequest
from sd_core.settings import Settings
from sd_core.warmup import WarmUpFailed

PROMPT = "a red fox in the snow"


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.float32)


def spy_calls(engine) -> list[dict]:
    """Every pipeline call the engine's denoiser makes from now on: its size, steps and pipeline class."""
    calls: list[dict] = []
    invoke = engine.denoiser.invoke

    def spying(pipe, kwargs):
        calls.append({"pipe": type(pipe).__name__, "size": (kwargs.get("width"), kwargs.get("height")),
                      "steps": kwargs["num_inference_steps"]})
        return invoke(pipe, kwargs)

    engine.denoiser.invoke = spying
    return calls


def test_setting_defaults_on_and_reads_off():
    assert Settings().warmup is True and Settings.from_env({}).warmup is True
    assert Settings.from_env({"SD_WARMUP": "0"}).warmup is False


def test_preload_runs_one_tiny_generation_per_model_and_reports_its_time(make_engine, caplog):
    engine = make_engine(preload_models=("tiny-sd15", "tiny-sdxl"))
    calls = spy_calls(engine)
    with caplog.at_level("INFO", logger="sd_core"):
        timings = engine.preload()
    logged = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("warm-up: tiny-sdxl in ") for line in logged), logged
    assert any(line.startswith("warm-up done in ") for line in logged), logged
    assert set(timings) == {"tiny-sd15", "tiny-sdxl", "warmup"} and timings["warmup"] > 0
    assert calls == [{"pipe": "StableDiffusionPipeline", "size": (64, 64), "steps": 1},
                     {"pipe": "StableDiffusionXLPipeline", "size": (64, 64), "steps": 1}]
    assert engine.pool.loaded == ["tiny-sd15", "tiny-sdxl"]
    engine.preload()  # a second preload: nothing new to warm
    assert len(calls) == 2


def test_warmup_off_runs_nothing(make_engine):
    engine = make_engine(warmup=False)
    calls = spy_calls(engine)
    assert set(engine.preload()) == {"tiny-sd15"} and calls == []


@pytest.fixture(scope="module")
def warm_and_cold(engine_settings):
    """The same models preloaded with and without the warm-up (micro-batching off: lone calls on both)."""
    import dataclasses

    from sd_core.engine import Engine

    engines = {}
    for warm in (True, False):
        engines[warm] = Engine(dataclasses.replace(engine_settings, warmup=warm, max_batch_images=1,
                                                   preload_models=("tiny-sd15", "tiny-sdxl")))
        engines[warm].preload()
    return engines


@pytest.mark.parametrize(("model", "scheduler"), [("tiny-sd15", None), ("tiny-sd15", "DPM++ 2M SDE Karras"),
                                                  ("tiny-sdxl", None), ("tiny-sdxl", "DPM++ 2M Karras")])
def test_the_first_image_after_a_warmup_is_the_image_without_one(warm_and_cold, model, scheduler):
    request = GenerationRequest(prompt=PROMPT, model=model, scheduler=scheduler, seed=5, num_inference_steps=3)
    assert np.array_equal(pixels(warm_and_cold[True].generate(request)), pixels(warm_and_cold[False].generate(request)))


def test_the_first_image_after_a_warmup_equals_bare_diffusers(warm_and_cold, tiny_bucket):
    """The default sampler (Euler a: ancestral noise from the generator) at the model's defaults, pixel for pixel."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    engine = warm_and_cold[True]
    result = engine.generate(GenerationRequest(prompt=PROMPT, seed=9))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    with torch.inference_mode():
        bare = pipe(prompt=[PROMPT], negative_prompt=None, num_inference_steps=4, guidance_scale=7.0, width=64,
                    height=64, generator=[torch.Generator("cpu").manual_seed(9)]).images[0]
    assert np.array_equal(pixels(result), np.asarray(bare.convert("RGB"), dtype=np.float32))


def test_warmup_leaves_the_schedulers_and_loras_as_loaded(make_engine):
    engines = {warm: make_engine(warmup=warm, preload_models=("tiny-sd15", "tiny-sdxl")) for warm in (True, False)}
    for engine in engines.values():
        engine.preload()
    for name in ("tiny-sd15", "tiny-sdxl"):
        warmed, plain = engines[True].pool.get(name), engines[False].pool.get(name)
        assert set(warmed.pipes) == {"txt2img"}
        scheduler, reference = warmed.pipes["txt2img"].scheduler, plain.pipes["txt2img"].scheduler
        assert type(scheduler) is type(reference) and dict(scheduler.config) == dict(reference.config)
        assert engines[True].loras.loaded(warmed) == [] and not warmed.vaes


def test_a_refiner_warms_up_through_a_base_it_refines(make_engine):
    engine = make_engine(preload_models=("tiny-sdxl", "tiny-sdxl-refiner"))
    calls = spy_calls(engine)
    timings = engine.preload()
    assert "warmup" in timings
    assert [c["pipe"] for c in calls] == ["StableDiffusionXLPipeline", "StableDiffusionXLPipeline",
                                          "StableDiffusionXLImg2ImgPipeline"]
    alone = make_engine(preload_models=("tiny-sdxl-refiner",))
    calls = spy_calls(alone)
    assert "warmup" not in alone.preload() and calls == []  # nothing it refines is preloaded: skipped, logged


def test_an_inpainting_model_warms_up_on_its_inpaint_path(make_engine, engine_settings, tmp_path):
    """A 9-channel UNet runs no txt2img: its warm-up is an inpaint, and its worker still starts."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "inpaint.yaml").write_text(json.dumps({
        "name": "inpaint", "architecture": "sd15", "format": "diffusers", "uri": "tiny-sd15-inpaint/diffusers/",
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 2}}))
    engine = make_engine(models_dir=models, default_model="inpaint")
    calls = spy_calls(engine)
    assert "warmup" in engine.preload()
    assert calls == [{"pipe": "StableDiffusionInpaintPipeline", "size": (64, 64), "steps": 1}]


def test_warmup_runs_the_safety_checker_and_survives_a_flag(make_engine, tmp_path):
    for variant in ("passes", "flags"):
        manifest = tmp_path / f"_safety_checker-{variant}.yaml"
        manifest.write_text(json.dumps({"name": f"tiny-{variant}", "uri": f"tiny-safety-checker/{variant}/"}))
        engine = make_engine(safety_checker=True, safety_checker_model=manifest)
        checked = []
        check = engine.safety.check
        engine.safety.check = lambda images, check=check, checked=checked: checked.append(len(images)) or check(images)
        timings = engine.preload()
        assert "safety_checker" in timings and "warmup" in timings and checked == [1], variant


def test_a_failed_warmup_fails_the_cold_start_clearly(make_engine):
    engine = make_engine()

    def broken(pipe, kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.denoiser.invoke = broken
    with pytest.raises(WarmUpFailed) as info:
        engine.preload()
    message = str(info.value)
    assert isinstance(info.value, WorkerUnhealthy)
    assert "warm-up generation of 'tiny-sd15' (64x64, 1 step(s)) failed" in message, message
    assert "RuntimeError: CUDA error" in message and "SD_WARMUP=off" in message and "Traceback" not in message


def test_a_failed_warmup_makes_the_runpod_worker_refuse_jobs(engine_settings, monkeypatch):
    import asyncio
    import dataclasses

    from handler import Worker
    from sd_core.denoise import Denoiser

    def broken(self, pipe, kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Denoiser, "invoke", broken)
    worker = Worker(dataclasses.replace(engine_settings, max_batch_images=1))
    answer = asyncio.run(worker.handler({"id": "1", "input": {"prompt": PROMPT}}))
    assert answer["refresh_worker"] is True
    assert answer["error"].startswith("worker failed to start: cold start: the warm-up generation of 'tiny-sd15'")


def test_the_runpod_cold_start_builds_the_output_bucket_client(engine_settings):
    # the first job's upload would otherwise pay boto3's client build (~0.7 s here) after "ready"
    import dataclasses

    from handler import Worker

    settings = dataclasses.replace(engine_settings, bucket_endpoint_url="http://127.0.0.1:9/results/out",
                                   bucket_access_key_id="key", bucket_secret_access_key="secret", warmup=False)
    worker = Worker(settings)
    assert worker.unhealthy is None and worker.uploader is not None
    assert worker.uploader._client is not None  # built (nothing sent: port 9 is never contacted)
