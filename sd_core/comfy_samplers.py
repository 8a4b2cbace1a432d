"""ComfyUI sampler_name x scheduler -> the engine's A1111 sampler name (sd_core/schedulers.py), or a clear refusal."""

from __future__ import annotations

import math

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
# A1111's SGM Uniform. ComfyUI's beta picks whole timesteps (A1111's Beta does not): refused.
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


def scheduler_name(node, sampler: str, scheduler: str) -> str:
    """The engine's sampler name for a KSampler's ``sampler_name`` and ``scheduler``; InvalidRequest naming the
    node, sampler and scheduler unless the engine runs that pair with ComfyUI's sigmas (``EXACT``)."""
    if sampler not in SAMPLERS or scheduler not in SCHEDULERS:
        what = f"sampler_name {quote(sampler, 40)}" if sampler not in SAMPLERS else f"scheduler {quote(scheduler, 40)}"
        raise node.error(f"{what} is unknown (with {_pair(sampler, scheduler)}); {_supported()}")
    if (sampler, scheduler) not in EXACT:
        raise node.error(f"{_pair(sampler, scheduler)} has no exact equivalent in this worker (its diffusers "
                         f"schedulers place their sigmas differently, docs/comfyui.md); {_supported()}")
    return combine(SAMPLERS[sampler], SCHEDULERS[scheduler])


def _pair(sampler, scheduler) -> str:
    return f"sampler_name {quote(sampler, 40)} and scheduler {quote(scheduler, 40)}"


def _supported() -> str:
    return "supported: " + ", ".join(f"{a} + {b}" for a, b in sorted(EXACT))


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
    """ComfyUI's schedule (``normal``, ``karras`` or ``exponential``) of ``steps`` steps, ending in 0."""
    low, high = math.exp(_LOG_SIGMAS[0]), math.exp(_LOG_SIGMAS[-1])
    ramp = [i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]
    if scheduler == "normal":
        out = [model_sigma(999 * (1 - r)) for r in ramp]
    elif scheduler == "karras":
        out = [(high ** (1 / 7) + r * (low ** (1 / 7) - high ** (1 / 7))) ** 7 for r in ramp]
    elif scheduler == "exponential":
        out = [math.exp(math.log(high) + r * (math.log(low) - math.log(high))) for r in ramp]
    else:
        raise ValueError(scheduler)
    return [*out, 0.0]


_LOG_SIGMAS = _log_sigmas()


# --- FLUX and SD3 (flow matching): ComfyUI's schedules on its flow model samplings -----------------------------------
FLUX_DEV_MU = 1.15  # ComfyUI's ModelSamplingFlux default: FLUX.1-dev-like models (with a guidance embedding)
# The schedulers computed here (ComfyUI's definitions on a flow model's sigma table); others are refused.
FLOW_SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential")


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

    table = [sigma((i + 1) / size) for i in range(size)]
    high, low = table[-1], table[0]
    if scheduler == "simple":  # every N/steps-th entry from the top
        every = size / steps
        return [table[-(1 + int(x * every))] for x in range(steps)] + [0.0]
    if scheduler == "beta":  # whole table indices at the beta(0.6, 0.6) quantiles, repeats dropped
        from scipy.stats import beta

        picked: list[int] = []
        for q in [1 - i / steps for i in range(steps)]:
            index = int(round(float(beta.ppf(q, 0.6, 0.6)) * (size - 1)))
            if not picked or picked[-1] != index:
                picked.append(index)
        return [table[i] for i in picked] + [0.0]
    ramp = [i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]
    if scheduler == "karras":  # k-diffusion's, rho 7, between the table's bounds
        top, bottom = high ** (1 / 7), low ** (1 / 7)
        return [(top + r * (bottom - top)) ** 7 for r in ramp] + [0.0]
    if scheduler == "exponential":
        return [math.exp(math.log(high) + r * (math.log(low) - math.log(high))) for r in ramp] + [0.0]
    start, end = high, low  # timestep(sigma) = sigma (ModelSamplingDiscreteFlow: times its multiplier, then back)
    if scheduler == "sgm_uniform":
        times = [start + (end - start) * i / steps for i in range(steps)]  # linspace(start, end, steps + 1)[:-1]
        return [sigma(t) for t in times] + [0.0]
    if scheduler != "normal":
        raise ValueError(scheduler)
    zero = math.isclose(sigma(end), 0, abs_tol=1e-5)
    count = steps + 1 if zero else steps
    times = [start + (end - start) * i / (count - 1) if count > 1 else start for i in range(count)]
    return [sigma(t) for t in times] + ([] if zero else [0.0])


def flow_schedule(node, scheduler: str, steps: int, mu: float | None, shift: float = 1.0) -> list[float]:
    """The ``sigmas`` of a request running ComfyUI's schedule (``comfy_flow_sigmas`` without its final 0: diffusers
    appends it); InvalidRequest naming ``node`` for a schedule that does not start from pure noise (sigma 1), as
    diffusers' flow pipelines do."""
    sigmas = comfy_flow_sigmas(scheduler, steps, mu, shift)
    if sigmas[-1] != 0 or not math.isclose(sigmas[0], 1.0, abs_tol=1e-6) or any(
            b >= a for a, b in zip(sigmas[:-1], sigmas[1:-1], strict=False)):
        raise node.error(f"scheduler {quote(scheduler, 40)} at {steps} steps gives a schedule diffusers cannot run "
                         "(not from sigma 1 down to 0)")
    return [min(1.0, s) for s in sigmas[:-1]]
