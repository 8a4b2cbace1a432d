"""ComfyUI sampler_name x scheduler -> the engine's A1111 sampler name (sd_core/schedulers.py), or a clear refusal."""

from __future__ import annotations

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
