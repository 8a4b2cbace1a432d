"""Samplers, schedules and seeds on the tiny models: same settings, same image as bare diffusers, every time."""

import io

import numpy as np
import pytest
from PIL import Image

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.schedulers import AYS_SD15, AYS_SDXL, NOT_RUNNABLE, SAMPLERS, SCHEDULER_NAMES, ays_schedule
from sd_core.schema import GenerationRequest, parse_request

PROMPT = "a red fox in the snow"


def pixels(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data)).convert("RGB"), dtype=np.float32)


def generate(engine, **fields):
    values = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 3, "guidance_scale": 7.0, "width": 64,
              "height": 64, **fields}
    return engine.generate(GenerationRequest(**values))


@pytest.fixture(scope="module")
def bare(tiny_bucket):
    """Bare diffusers pipelines loaded from the tiny models' diffusers folders (no sd_core involved)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipes = {}

    def get(arch: str):
        if arch not in pipes:
            cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
            pipes[arch] = cls.from_pretrained(tiny_bucket / f"tiny-{arch}" / "diffusers", local_files_only=True)
            pipes[arch].set_progress_bar_config(disable=True)
            pipes[arch].base_config = dict(pipes[arch].scheduler.config)  # tests swap schedulers in
        return pipes[arch]

    return get


def bare_image(pipe, scheduler, seed: int, **kwargs) -> np.ndarray:
    import torch

    pipe.scheduler = scheduler
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras"])
def test_sde_sampler_same_seed_same_image(engine, name):
    import torch

    torch.manual_seed(0)  # the Brownian noise must not come from torch's global RNG
    first = generate(engine, scheduler=name, seed=7, num_outputs=2)
    torch.manual_seed(1)
    again = generate(engine, scheduler=name, seed=7, num_outputs=2)
    for index in range(2):
        assert np.array_equal(pixels(first, index), pixels(again, index)), index
    assert np.abs(pixels(first, 0) - pixels(first, 1)).mean() > 0.5


def test_sde_image_i_is_defined_by_its_own_seed(engine):
    batch = generate(engine, scheduler="DPM++ SDE Karras", seed=20, num_outputs=2)
    alone = generate(engine, scheduler="DPM++ SDE Karras", seed=21)
    assert np.abs(pixels(batch, 1) - pixels(alone)).max() <= 2  # batch-size dependent kernels only


@pytest.mark.parametrize(("arch", "name", "flags"), [("sd15", "DPM++ SDE Karras", {"use_karras_sigmas": True}),
                                                      ("sdxl", "DPM++ SDE", {})])
def test_sde_sampler_equals_bare_diffusers_seeded_noise_sampler(engine, bare, arch, name, flags):
    from diffusers import DPMSolverSDEScheduler

    pipe = bare(arch)
    scheduler = DPMSolverSDEScheduler.from_config(pipe.base_config, noise_sampler_seed=42, timestep_spacing="linspace",
                                                  **flags)
    expected = bare_image(pipe, scheduler, 42, negative_prompt="blurry")
    result = generate(engine, model=f"tiny-{arch}", scheduler=name, seed=42, negative_prompt="blurry")
    assert np.array_equal(pixels(result), expected)


def test_sdxl_empty_negative_prompt_equals_bare_diffusers_without_one(engine, bare):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = bare("sdxl")
    assert pipe.config.force_zeros_for_empty_prompt
    expected = bare_image(pipe, EulerAncestralDiscreteScheduler.from_config(pipe.base_config,
                                                                             timestep_spacing="linspace"), 3)
    result = generate(engine, model="tiny-sdxl", scheduler="Euler a", seed=3, negative_prompt="")
    assert np.array_equal(pixels(result), expected)
    encoded_empty = generate(engine, model="tiny-sdxl", scheduler="Euler a", seed=3, negative_prompt=" ")
    assert not np.array_equal(pixels(encoded_empty), expected)  # a non-empty negative prompt is encoded


def test_sd15_empty_negative_prompt_equals_bare_diffusers(engine, bare):
    from diffusers import DPMSolverMultistepScheduler

    pipe = bare("sd15")
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.base_config, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")
    expected = bare_image(pipe, scheduler, 4)
    assert np.array_equal(pixels(generate(engine, scheduler="DPM++ 2M Karras", seed=4)), expected)


@pytest.mark.parametrize(("name", "cls", "flags"), [
    ("DPM++ 2M Exponential", "DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    ("DPM++ 2M SDE Heun Karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}),
    ("Euler", "EulerDiscreteScheduler", {}),
])
def test_sampler_and_schedule_equal_bare_diffusers(engine, bare, name, cls, flags):
    """Bare diffusers configured as docs/api.md tells (A1111's k-samplers: "linspace" timestep spacing)."""
    import diffusers

    pipe = bare("sd15")
    scheduler = getattr(diffusers, cls).from_config(pipe.base_config, timestep_spacing="linspace", **flags)
    expected = bare_image(pipe, scheduler, 5)
    assert np.array_equal(pixels(generate(engine, scheduler=name, seed=5)), expected)


def test_uniform_schedule_overrides_a_model_config_that_turns_karras_on():
    from sd_core.schedulers import build_scheduler

    base = {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "num_train_timesteps": 1000}
    assert build_scheduler("Euler", base).config.use_karras_sigmas is False
    karras = build_scheduler("Euler Karras", {**base, "use_karras_sigmas": False})
    assert karras.config.use_karras_sigmas is True and karras.config.use_exponential_sigmas is False


# --- every sampler x every A1111 schedule: runs, or is refused naming both --------------------------------------------
A1111_SCHEDULES = ("Uniform", "Karras", "Exponential", "Beta", "SGM Uniform", "Align Your Steps", "Polyexponential",
                   "KL Optimal", "Simple", "Normal", "DDIM")
PAIRS = [(sampler, schedule) for sampler in (*SAMPLERS, *NOT_RUNNABLE) for schedule in A1111_SCHEDULES]


def refusal(call) -> str | None:
    try:
        call()
    except InvalidRequest as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(("sampler", "schedule"), PAIRS)
def test_every_sampler_and_schedule_runs_or_is_refused_naming_both(engine, sampler, schedule):
    name = sampler if schedule == "Uniform" else f"{sampler} {schedule}"
    native = refusal(lambda: parse_request({"scheduler": name}))
    payload = {"prompt": PROMPT, "steps": 2, "sampler_name": sampler, "scheduler": schedule}
    from_a1111 = refusal(lambda: a1111.to_request(a1111.parse_call(payload)))
    if native is None:
        assert from_a1111 is None, from_a1111
        result = generate(engine, scheduler=name, num_inference_steps=2)
        assert result.request.scheduler == name and pixels(result).std() > 0
        return
    for message in (native, from_a1111):
        assert message is not None and message.startswith(("scheduler: ", "sampler_name: ")), message
        assert sampler in message, message
        # a sampler that never runs is refused for itself; a pair, naming both
        assert sampler in NOT_RUNNABLE or schedule in message, message
    assert (name in SCHEDULER_NAMES) is False


def test_runnable_pairs_are_the_documented_table():
    runs = {(s, sch) for s, sch in PAIRS if refusal(lambda s=s, sch=sch: parse_request(
        {"scheduler": s if sch == "Uniform" else f"{s} {sch}"})) is None}
    flagged = ("Uniform", "Karras", "Exponential", "Beta", "Normal")  # diffusers' flags with "linspace" spacing
    assert runs == {*((s, sch) for s in ("Heun", "LMS", "DPM++ SDE") for sch in flagged),
                    *((s, sch) for s in ("DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun")
                      for sch in ("Karras", "Exponential", "Beta")),  # DPM-Solver rounds its uniform timesteps
                    *(("Euler", sch) for sch in (*flagged, "SGM Uniform", "Align Your Steps")),  # + sigmas=
                    ("Euler a", "Uniform"), ("Euler a", "Normal"),
                    *((s, "Uniform") for s in ("DDIM", "PLMS", "UniPC", "LCM", "TCD"))}


# --- the new schedules equal bare diffusers with the same flags -------------------------------------------------------
@pytest.mark.parametrize(("name", "cls", "flags"), [
    ("DPM++ 2M Beta", "DPMSolverMultistepScheduler", {"use_beta_sigmas": True, "timestep_spacing": "linspace"}),
    ("LMS Exponential", "LMSDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
])
def test_new_schedules_equal_bare_diffusers(engine, bare, name, cls, flags):
    import diffusers

    pipe = bare("sd15")
    expected = bare_image(pipe, getattr(diffusers, cls).from_config(pipe.base_config, **flags), 6)
    result = pixels(generate(engine, scheduler=name, seed=6))
    assert np.array_equal(result, expected)
    plain = bare_image(pipe, getattr(diffusers, cls).from_config(pipe.base_config), 6)
    assert not np.array_equal(result, plain)  # the schedule changed the image


def test_euler_normal_equals_bare_diffusers_with_comfyuis_normal_sigmas(engine, bare):
    """A1111 1.10's / ComfyUI's Normal: sigmas at timesteps 999, 499.5, 0 (log-interpolated), then 0."""
    from diffusers import EulerDiscreteScheduler

    pipe = bare("sd15")
    cumprod = EulerDiscreteScheduler.from_config(pipe.base_config).alphas_cumprod.double().numpy()
    train = ((1 - cumprod) / cumprod) ** 0.5  # the model's sigma at each training timestep
    sigmas = [train[999], float(np.sqrt(train[499] * train[500])), train[0], 0.0]
    scheduler = EulerDiscreteScheduler.from_config(pipe.base_config, timestep_spacing="linspace")  # noise x sigma_max
    expected = bare_image(pipe, scheduler, 8, sigmas=sigmas)
    result = generate(engine, scheduler="Euler Normal", seed=8)
    assert np.array_equal(pixels(result), expected)
    # A1111's Uniform is the same schedule (diffusers' "linspace" spacing: within 1e-4 of these sigmas) ...
    assert np.abs(pixels(generate(engine, scheduler="Euler", seed=8)) - expected).max() <= 1
    # ... and bare diffusers on the model's "leading" spacing is not
    assert not np.array_equal(bare_image(pipe, EulerDiscreteScheduler.from_config(pipe.base_config), 8), expected)


# A1111's Align Your Steps tables at 3 steps: log-linear interpolation of 11 sigmas hits entries 0, 5 and 10, then 0.
@pytest.mark.parametrize(("arch", "sigmas"), [("sd15", [14.615, 1.396, 0.029, 0.0]),
                                              ("sdxl", [14.615, 0.862, 0.029, 0.0])])
def test_align_your_steps_equals_bare_diffusers_with_the_family_sigmas(engine, bare, arch, sigmas):
    from diffusers import EulerDiscreteScheduler

    pipe = bare(arch)
    scheduler = EulerDiscreteScheduler.from_config(pipe.base_config, timestep_spacing="linspace")  # noise x sigma_max
    expected = bare_image(pipe, scheduler, 8, sigmas=sigmas)
    result = generate(engine, model=f"tiny-{arch}", scheduler="Euler Align Your Steps", seed=8)
    assert np.array_equal(pixels(result), expected)


def test_align_your_steps_interpolates_as_a1111():
    assert ays_schedule(AYS_SD15, 11) == [*AYS_SD15, 0.0]
    ten = ays_schedule(AYS_SDXL, 10)
    assert len(ten) == 11 and ten[0] == pytest.approx(14.615) and ten[-2] == pytest.approx(0.029)
    assert all(a > b for a, b in zip(ten, ten[1:], strict=False))


def test_tcd_equals_bare_diffusers_with_its_default_eta(engine, bare):
    from diffusers import TCDScheduler

    pipe = bare("sd15")
    expected = bare_image(pipe, TCDScheduler.from_config(pipe.base_config), 9, eta=0.3)
    assert np.array_equal(pixels(generate(engine, scheduler="TCD", seed=9)), expected)


# --- eta --------------------------------------------------------------------------------------------------------------
def test_ddim_eta_changes_the_image_and_equals_bare_diffusers(engine, bare):
    from diffusers import DDIMScheduler

    pipe = bare("sd15")
    default = pixels(generate(engine, scheduler="DDIM", seed=10))
    assert np.array_equal(default, bare_image(pipe, DDIMScheduler.from_config(pipe.base_config), 10, eta=0.0))
    result = generate(engine, scheduler="DDIM", seed=10, eta=0.7)
    assert ", Eta DDIM: 0.7," in result.parameters  # A1111's infotext key for a DDIM eta other than 0
    noisy = pixels(result)
    assert not np.array_equal(noisy, default)
    assert np.array_equal(noisy, bare_image(pipe, DDIMScheduler.from_config(pipe.base_config), 10, eta=0.7))


def test_eta_is_refused_where_diffusers_has_none(engine):
    with pytest.raises(InvalidRequest) as caught:
        generate(engine, scheduler="Euler a", eta=0.5)
    message = str(caught.value)
    assert message.startswith("eta: ") and "'Euler a'" in message and "0.5" in message
    with pytest.raises(InvalidRequest, match="DPM\\+\\+ SDE Karras|DPM\\+\\+ SDE"):
        generate(engine, scheduler="DPM++ SDE Karras", eta=0)
    # The sampler's own eta is what it runs: accepted. A sampler without noise has no eta, as in A1111.
    assert np.array_equal(pixels(generate(engine, scheduler="Euler a", eta=1)),
                          pixels(generate(engine, scheduler="Euler a")))
    assert np.array_equal(pixels(generate(engine, scheduler="Euler", eta=0.5)),
                          pixels(generate(engine, scheduler="Euler")))


def test_jobs_with_different_eta_never_share_a_batch():
    from sd_core.jobs import Job

    jobs = [Job(request=GenerationRequest(scheduler="DDIM", eta=eta, model="m"), manifest=None, width=64, height=64,
                seeds=[1]) for eta in (0.0, 0.5)]
    assert jobs[0].batch_key != jobs[1].batch_key


def test_explicit_sigmas_equal_bare_diffusers_euler_called_with_them(engine, bare):
    """A request's own sigmas (ComfyUI's schedules come this way) run on Euler: bare diffusers' EulerDiscreteScheduler
    given the same sigmas then 0, in txt2img and in img2img (whose strength runs the last of them)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from tests.fixtures.images import png_b64

    pipe = bare("sd15")
    sigmas = [12.0, 3.5, 0.4]
    scheduler = EulerDiscreteScheduler.from_config(pipe.base_config, timestep_spacing="linspace")  # noise x sigma 0
    expected = bare_image(pipe, scheduler, 8, sigmas=[*sigmas, 0.0])
    result = generate(engine, sigmas=sigmas, seed=8)  # no scheduler: Euler, whatever the model's default
    assert np.array_equal(pixels(result), expected)
    assert "Sampler: Euler," in result.parameters and "Sigmas: 12 3.5 0.4" in result.parameters
    assert not np.array_equal(pixels(generate(engine, scheduler="Euler", seed=8)), expected)
    init = Image.fromarray(expected.astype(np.uint8))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.scheduler = EulerDiscreteScheduler.from_config(pipe.base_config, timestep_spacing="linspace")
    with torch.inference_mode():
        want = img2img(prompt=PROMPT, image=init, strength=0.7, sigmas=[*sigmas, 0.0], guidance_scale=7.0,
                       generator=torch.Generator("cpu").manual_seed(8), output_type="pil").images[0]
    got = generate(engine, sigmas=sigmas, seed=8, image=png_b64(init), strength=0.7)
    assert np.array_equal(pixels(got), np.asarray(want.convert("RGB"), dtype=np.float32))


def test_explicit_sigmas_are_refused_where_they_would_not_run_exactly(engine):
    sd15 = "^sigmas: 'tiny-sd15' is a sd15 model, whose sigmas"
    for fields, reason in (({"scheduler": "DPM++ 2M Karras"}, "run with the Euler sampler only"),
                           ({"scheduler": "Euler Karras"}, "run with the Euler sampler only"),
                           ({"hires": {"scale": 2}}, "are not supported with the hires fix"),
                           ({"refine": "expert_ensemble_refiner"}, "are not supported with a refiner")):
        with pytest.raises(InvalidRequest, match=f"{sd15} {reason}"):
            generate(engine, sigmas=[12.0, 3.5, 0.4], **fields)
    with pytest.raises(InvalidRequest, match="^sigmas: each sigma must be above 0 and at most 1000"):
        parse_request({"sigmas": [2000.0, 1.0]})
