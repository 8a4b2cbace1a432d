"""A1111's sigma schedules, recomputed here from their definitions, against the engine's schedulers (SD 1.5, SDXL)."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from sd_core import a1111
from sd_core.errors import InvalidRequest
from sd_core.schedulers import SCHEDULER_NAMES, build_scheduler, pipeline_kwargs, split_name
from sd_core.schema import GenerationRequest, parse_request

# The real models' scheduler_config.json (SD 1.5: PNDM; SDXL base 1.0: Euler), written out here: no download.
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
# A model whose config would move every schedule if it leaked (a "trailing" Lightning-style config, and more).
LEAKY = {**SDXL, "timestep_spacing": "trailing", "use_karras_sigmas": True, "interpolation_type": "log_linear",
         "final_sigmas_type": "sigma_min", "steps_offset": 0}
# A1111 1.10's Align Your Steps tables (sd_schedulers.py), SD 1.5's and SDXL's.
AYS = {"sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
       "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)}
MODELS = {"sd15": SD15, "sdxl": SDXL}
OWN_TIMESTEPS = ("DDIM", "PLMS", "UniPC", "LCM", "TCD")  # not k-diffusion samplers: no sigma schedule in A1111
K_NAMES = [name for name in SCHEDULER_NAMES if split_name(name)[0] not in OWN_TIMESTEPS]

# ldm's scaled_linear betas (float64), the model's alphas_cumprod and k-diffusion's sigmas (CompVisDenoiser).
BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
CUMPROD = np.cumprod(1.0 - BETAS)
TRAIN_SIGMAS = np.sqrt((1.0 - CUMPROD) / CUMPROD)


def t_to_sigma(t, train: np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteSchedule.t_to_sigma: log sigma interpolated between whole timesteps."""
    t = np.asarray(t, dtype=np.float64)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    frac = t - low
    return np.exp((1 - frac) * np.log(train[low]) + frac * np.log(train[high]))


def a1111_sigmas(schedule: str, steps: int, family: str, train: np.ndarray = TRAIN_SIGMAS) -> np.ndarray:
    """A1111 1.10's schedule (modules/sd_schedulers.py + k-diffusion), steps sigmas then 0."""
    low, high = train[0], train[-1]  # the model's sigma_min, sigma_max
    if schedule in ("Uniform", "Normal"):  # model_wrap.get_sigmas(n) / normal_scheduler: t from 999 to 0
        sigmas = t_to_sigma(np.linspace(999, 0, steps), train)
    elif schedule == "SGM Uniform":  # steps + 1 timesteps from 999 to 0, the last dropped
        sigmas = t_to_sigma(np.linspace(999, 0, steps + 1)[:-1], train)
    elif schedule == "Karras":  # get_sigmas_karras, rho 7
        ramp = np.linspace(0, 1, steps)
        sigmas = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    elif schedule == "Exponential":
        sigmas = np.exp(np.linspace(np.log(high), np.log(low), steps))
    elif schedule == "Beta":  # alpha = beta = 0.6 (A1111's defaults)
        sigmas = low + stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6) * (high - low)
    elif schedule == "Align Your Steps":  # the 11 sigmas, log-linearly interpolated to `steps`
        table = np.asarray(AYS[family])
        sigmas = table if steps == len(table) else np.exp(
            np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), np.log(table[::-1])))[::-1]
    else:
        raise AssertionError(schedule)
    return np.append(sigmas, 0.0)


def engine_sigmas(name: str, config: dict, family: str, steps: int) -> np.ndarray:
    """The sigmas the engine's scheduler for ``name`` steps through, with what the pipeline call gets."""
    scheduler = build_scheduler(name, config, steps)
    sigmas = pipeline_kwargs(name, steps, None, AYS[family], scheduler).get("sigmas")
    scheduler.set_timesteps(**({"sigmas": sigmas} if sigmas else {"num_inference_steps": steps}))
    got = scheduler.sigmas.double().numpy()
    if len(got) == 2 * steps:  # Heun and DPM++ SDE: every sigma but the first and the last twice
        assert np.array_equal(got[1:-1:2], got[2:-1:2])
        got = np.append(got[0::2], got[-1])
    return got


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 33])  # 1: SDXL Turbo's single step, at sigma_max as in A1111
@pytest.mark.parametrize("name", K_NAMES)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_k_sampler_runs_a1111s_sigmas(family, name, steps):
    schedule = split_name(name)[1] or "Uniform"
    np.testing.assert_allclose(engine_sigmas(name, MODELS[family], family, steps),
                               a1111_sigmas(schedule, steps, family), rtol=1e-4, atol=1e-7)


def test_euler_starts_at_sigma_max_not_at_the_leading_spacings_first_sigma():
    """The defect this table fixes: on SD 1.5 / SDXL's "leading" spacing Euler at 20 steps started at 11.03."""
    assert engine_sigmas("Euler", SD15, "sd15", 20)[0] == pytest.approx(14.6146, abs=1e-4)
    assert engine_sigmas("DPM++ SDE Karras", SDXL, "sdxl", 4)[0] == pytest.approx(14.6146, abs=1e-4)


@pytest.mark.parametrize("name", K_NAMES)
def test_a_models_own_spacing_and_sigma_flags_do_not_leak(name):
    schedule = split_name(name)[1] or "Uniform"
    np.testing.assert_allclose(engine_sigmas(name, LEAKY, "sdxl", 20), a1111_sigmas(schedule, 20, "sdxl"),
                               rtol=1e-4, atol=1e-7)


# --- A1111's timestep samplers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SD15, SDXL, LEAKY])
@pytest.mark.parametrize("steps", [4, 20, 25])
def test_ddim_and_plms_run_a1111s_timesteps(config, steps):
    """A1111: range(0, 1000, 1000 // steps) + 1, at most 999. (At step counts whose range has more than `steps`
    entries, 3 or 30, A1111 runs those extra steps: a known gap, docs/api.md.)"""
    expected = np.minimum(np.arange(0, 1000, 1000 // steps) + 1, 999)[::-1]
    assert len(expected) == steps
    for name in ("DDIM", "PLMS"):
        scheduler = build_scheduler(name, config)
        scheduler.set_timesteps(steps)
        assert np.array_equal(np.unique(scheduler.timesteps.numpy())[::-1], expected), name


def unipc_sigma(t: np.ndarray) -> np.ndarray:
    """A1111's UniPC noise schedule (NoiseScheduleVP 'discrete'): log alpha linear between whole timesteps."""
    log_alpha = np.interp(t, np.arange(1000), 0.5 * np.log(CUMPROD))
    return np.sqrt(1 - np.exp(2 * log_alpha)) / np.exp(log_alpha)


@pytest.mark.parametrize("config", [SD15, LEAKY])
def test_unipc_runs_a1111s_variant_order_and_time_uniform_steps(config):
    scheduler = build_scheduler("UniPC", config)
    assert (scheduler.config.solver_type, scheduler.config.solver_order, scheduler.config.lower_order_final) == (
        "bh1", 3, True)  # A1111's uni_pc_variant, uni_pc_order, uni_pc_lower_order_final defaults
    for steps in (3, 9, 27, 20):
        scheduler.set_timesteps(steps)
        times = np.linspace(999, 0, steps + 1)  # time_uniform from t_T to t_0 = 1 / N: timesteps 999 .. 0
        assert np.array_equal(scheduler.timesteps.numpy(), np.round(times[:-1]))
        if 999 % steps == 0:  # whole timesteps: A1111's exactly (otherwise within half a timestep: docs/api.md)
            np.testing.assert_allclose(scheduler.sigmas.double().numpy(), unipc_sigma(times), rtol=1e-4)


# --- refused: no diffusers path gives A1111's sigmas ------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "schedule"), [
    ("DPM2", "Automatic"), ("DPM2 a", "Karras"), ("DPM++ 2M", "Uniform"), ("DPM++ 2M SDE Heun", "SGM Uniform"),
    ("Euler a", "Karras"), ("Heun", "SGM Uniform"), ("LMS", "SGM Uniform"), ("DPM++ SDE", "SGM Uniform"),
])
def test_pairs_without_a1111s_sigmas_are_refused_naming_them(sampler, schedule):
    payload = {"prompt": "x", "steps": 4, "sampler_name": sampler, "scheduler": schedule}
    with pytest.raises(InvalidRequest) as info:
        a1111.to_request(a1111.parse_call(payload))
    message = str(info.value)
    assert message.startswith(("scheduler: ", "sampler_name: ")) and sampler in message, message
    assert schedule in message or "no faithful diffusers equivalent" in message, message
    with pytest.raises(InvalidRequest):
        parse_request({"scheduler": sampler if schedule in ("Uniform", "Automatic") else f"{sampler} {schedule}"})


# --- pixels: the engine equals bare diffusers configured as docs/api.md says ------------------------------------------
@pytest.fixture(scope="module")
def bare_sd15(tiny_bucket):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bucket / "tiny-sd15" / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize(("name", "cls", "flags"), [
    # + sigmas=, A1111's SGM Uniform; "linspace": the first noise is sigma_max, not sqrt(sigma_max² + 1)
    ("Euler SGM Uniform", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("Heun Beta", "HeunDiscreteScheduler", {"timestep_spacing": "linspace", "use_beta_sigmas": True}),
    ("UniPC", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True,
                                          "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
    ("DDIM", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
])
def test_engine_equals_bare_diffusers_configured_per_docs(engine, bare_sd15, name, cls, flags):
    import diffusers
    import torch

    pipe, base = bare_sd15
    pipe.scheduler = getattr(diffusers, cls).from_config(base, **flags)
    cumprod = pipe.scheduler.alphas_cumprod.double().numpy()  # the sigmas of the model's own scheduler config
    train = np.sqrt((1 - cumprod) / cumprod)
    extra = {"sigmas": [float(s) for s in a1111_sigmas("SGM Uniform", 3, "sd15", train)]} if "SGM" in name else {}
    with torch.inference_mode():
        expected = pipe(prompt="a red fox in the snow", num_inference_steps=None if extra else 3, guidance_scale=7.0,
                        width=64, height=64, generator=torch.Generator("cpu").manual_seed(12), **extra).images[0]
    result = engine.generate(GenerationRequest(prompt="a red fox in the snow", seed=12, num_inference_steps=3,
                                               guidance_scale=7.0, width=64, height=64, scheduler=name))
    got = pixels(Image.open(io.BytesIO(result.images[0].data)))
    assert np.array_equal(got, pixels(expected))
