"""ComfyUI sampler_name x scheduler -> the engine's A1111 sampler name (sd_core/schedulers.py), or a clear refusal."""

from __future__ import annotations

import math

from .comfy_schedules import Sampling, schedule
from .errors import quote
from .schedulers import BETA, EXPONENTIAL, KARRAS, NORMAL, SGM_UNIFORM, combine

# ComfyUI's samplers -> the engine's (A1111's) sampler running the same algorithm. ComfyUI's `ddim` is its Euler
# sampler (DDIM with eta 0 is Euler's step); the `_gpu` variants differ only in where their noise is drawn.
SAMPLERS = {
    "euler": "Euler", "ddim": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
    "uni_pc": "UniPC", "uni_pc_bh2": "UniPC", "lcm": "LCM", "dpmpp_3m_sde": "DPM++ 3M SDE",
}
# ComfyUI's schedulers -> A1111 1.10's schedule type of the same definition (A1111 took them from ComfyUI). ComfyUI's
# normal (sigmas at timesteps evenly spaced from the last to 0) is A1111's Normal (= its Uniform); sgm_uniform is
# A1111's SGM Uniform. ComfyUI's beta picks whole timesteps (A1111's Beta does not): run as SIGMA_PAIRS below.
SCHEDULERS = {"normal": NORMAL, "karras": KARRAS, "exponential": EXPONENTIAL, "sgm_uniform": SGM_UNIFORM,
              "beta": BETA, "simple": "Simple", "ddim_uniform": "DDIM", "kl_optimal": "KL Optimal",
              "linear_quadratic": "Linear Quadratic"}
# The pairs this engine runs with ComfyUI's sigmas (tests/sd_core/test_comfy_graph.py recomputes ComfyUI's schedules
# and compares them with the engine's scheduler for SD 1.5 / SDXL's scheduler config): the engine's A1111 schedules
# (sd_core/schedulers.py) that ComfyUI defines the same way. Refused: DPM-Solver++ with normal / sgm_uniform (diffusers
# rounds its timesteps), the other samplers with sgm_uniform (no custom sigmas but Euler's), dpm_2 (its engine name
# means A1111's DPM2, which drops the next-to-last sigma, and diffusers cannot), UniPC and LCM (their own timesteps).
_EULER_LIKE = ("euler", "ddim")
_FLAGGED = ("heun", "lms", "dpmpp_sde", "dpmpp_sde_gpu")
_MULTISTEP = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu")
EXACT = {*((sampler, scheduler) for sampler in _EULER_LIKE for scheduler in (
             "normal", "karras", "exponential", "sgm_uniform")),
         ("euler_ancestral", "normal"),
         *((sampler, scheduler) for sampler in _FLAGGED for scheduler in ("normal", "karras", "exponential")),
         *((sampler, scheduler) for sampler in _MULTISTEP for scheduler in ("karras", "exponential"))}
# ComfyUI's schedulers no A1111 schedule of the engine's equals: Euler runs them as the request's own ``sigmas``
# (ComfyUI's, computed by sd_schedule()), on SD 1.x / SD2 / SDXL (diffusers' EulerDiscreteScheduler takes sigmas).
SIGMA_SCHEDULERS = ("simple", "ddim_uniform", "beta", "kl_optimal", "linear_quadratic")
SIGMA_PAIRS = {(sampler, scheduler) for sampler in _EULER_LIKE for scheduler in SIGMA_SCHEDULERS}


def scheduler_name(node, sampler: str, scheduler: str) -> str:
    """The engine's sampler name for a KSampler's ``sampler_name`` and ``scheduler``; InvalidRequest naming the
    node, sampler and scheduler unless the engine runs that pair with ComfyUI's sigmas (``EXACT``, or Euler with the
    request's ``sigmas``: ``SIGMA_PAIRS``)."""
    if sampler not in SAMPLERS or scheduler not in SCHEDULERS:
        what = f"sampler_name {quote(sampler, 40)}" if sampler not in SAMPLERS else f"scheduler {quote(scheduler, 40)}"
        raise node.error(f"{what} is unknown (with {_pair(sampler, scheduler)}); {_supported()}")
    if (sampler, scheduler) in SIGMA_PAIRS:
        return "Euler"
    if (sampler, scheduler) not in EXACT:
        raise node.error(f"{_pair(sampler, scheduler)} has no exact equivalent in this worker (its diffusers "
                         f"schedulers place their sigmas differently, docs/comfyui.md); {_supported()}")
    return combine(SAMPLERS[sampler], SCHEDULERS[scheduler])


def _pair(sampler, scheduler) -> str:
    return f"sampler_name {quote(sampler, 40)} and scheduler {quote(scheduler, 40)}"


def _supported() -> str:
    return ("supported: " + ", ".join(f"{a} + {b}" for a, b in sorted(EXACT)) + "; and, on ComfyUI's own sigmas, "
            f"{' / '.join(_EULER_LIKE)} + {' / '.join(SIGMA_SCHEDULERS)}")


# --- ComfyUI's noise levels for SD 1.x / SDXL (scaled linear betas 0.00085 to 0.012 over 1000 timesteps) -----------
def _log_sigmas() -> list[float]:
    log_sigmas, cumprod = [], 1.0
    for i in range(1000):
        beta = (0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2
        cumprod *= 1 - beta
        log_sigmas.append(0.5 * math.log((1 - cumprod) / cumprod))
    return log_sigmas


def model_sigma(t: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.sigma: log sigma interpolated between whole timesteps."""
    log_sigmas = _LOG_SIGMAS
    low, high, w = math.floor(t), math.ceil(t), t - math.floor(t)
    return math.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def percent_to_sigma(percent: float) -> float:
    """ComfyUI's percent_to_sigma: a ControlNet's start/end percent as the noise level it starts/stops at."""
    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    return model_sigma((1 - percent) * 999)


def sigmas(scheduler: str, steps: int) -> list[float]:
    """ComfyUI's ``scheduler`` schedule of ``steps`` steps on SD 1.x / SDXL's ModelSamplingDiscrete, ending in 0
    (beta and ddim_uniform may have another count; ValueError for kl_optimal's one step)."""
    return schedule(SD_SAMPLING, scheduler, steps)


def sd_schedule(node, sampler: str, scheduler: str, steps: int) -> list[float] | None:
    """The request's ``sigmas`` (ComfyUI's schedule without its final 0) for a pair run as Euler on ComfyUI's own
    sigmas (``SIGMA_PAIRS``); None for the other pairs (``EXACT``: an A1111 schedule of the engine's)."""
    if (sampler, scheduler) not in SIGMA_PAIRS:
        return None
    _check_steps(node, scheduler, steps)
    return sigmas(scheduler, steps)[:-1]


def _check_steps(node, scheduler: str, steps: int) -> None:
    """InvalidRequest naming ``node`` for kl_optimal at one step (ComfyUI's formula divides by steps - 1: NaN)."""
    if scheduler == "kl_optimal" and steps < 2:
        raise node.error("scheduler 'kl_optimal' needs at least 2 steps (ComfyUI's formula divides by steps - 1: NaN)")


_LOG_SIGMAS = _log_sigmas()
SD_SAMPLING = Sampling(tuple(math.exp(x) for x in _LOG_SIGMAS), model_sigma, 999.0, 0.0)  # timestep(sigma_max) = 999


# --- FLUX and SD3 (flow matching): ComfyUI's schedules on its flow model samplings -----------------------------------
FLUX_DEV_MU = 1.15  # ComfyUI's ModelSamplingFlux default: FLUX.1-dev-like models (with a guidance embedding)
# The schedulers computed here (ComfyUI's definitions on a flow model's sigma table); ddim_uniform is refused: it
# starts below the table's top (sigma 1, the pure noise diffusers' flow pipelines start from) at any usable step count.
FLOW_SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential", "kl_optimal",
                   "linear_quadratic")


def flux_mu(max_shift: float, base_shift: float, width: int, height: int) -> float:
    """ComfyUI's ModelSamplingFlux node: the shift (mu) at ``width`` x ``height`` (a line through 256 and 4096
    image tokens: one token per 16x16 pixels)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return width * height / (8 * 8 * 2 * 2) * slope + base_shift - slope * 256


def comfy_flow_sigmas(scheduler: str, steps: int, mu: float | None, shift: float = 1.0) -> list[float]:
    """ComfyUI's ``scheduler`` sigmas (ending in 0) for a flow model: ModelSamplingFlux (``mu``: a 10000-entry table
    of exp(mu) / (exp(mu) + 1/t - 1) at t = 1/N .. 1) or, ``mu`` None, ModelSamplingDiscreteFlow (``shift``: 1000
    entries of shift t / (1 + (shift - 1) t); SD3's 3.0, FLUX.1-schnell's 1.0). The model's timestep is its sigma
    (times 1000 in both ComfyUI and diffusers), so the table's bounds are 1 and the shifted 1/N."""
    size = 1000 if mu is None else 10000

    def sigma(t: float) -> float:
        if mu is None:
            return shift * t / (1 + (shift - 1) * t)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))

    if scheduler not in FLOW_SCHEDULERS:
        raise ValueError(scheduler)
    table = tuple(sigma((i + 1) / size) for i in range(size))
    # timestep(sigma) = sigma (ModelSamplingDiscreteFlow: times its multiplier, then back), so t_max / t_min are the
    # table's bounds
    return schedule(Sampling(table, sigma, table[-1], table[0]), scheduler, steps)


def flow_schedule(node, scheduler: str, steps: int, mu: float | None, shift: float = 1.0) -> list[float]:
    """The ``sigmas`` of a request running ComfyUI's schedule (``comfy_flow_sigmas`` without its final 0: diffusers
    appends it); InvalidRequest naming ``node`` for a schedule that does not start from pure noise (sigma 1), as
    diffusers' flow pipelines do."""
    _check_steps(node, scheduler, steps)
    sigmas = comfy_flow_sigmas(scheduler, steps, mu, shift)
    if sigmas[-1] != 0 or not math.isclose(sigmas[0], 1.0, abs_tol=1e-6) or any(
            b >= a for a, b in zip(sigmas[:-1], sigmas[1:-1], strict=False)):
        raise node.error(f"scheduler {quote(scheduler, 40)} at {steps} steps gives a schedule diffusers cannot run "
                         "(not from sigma 1 down to 0)")
    return [min(1.0, s) for s in sigmas[:-1]]
