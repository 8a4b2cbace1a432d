"""ComfyUI sampler_name x scheduler -> the engine's A1111 sampler name (sd_core/schedulers.py), or a clear refusal."""

from __future__ import annotations

from .errors import InvalidRequest, quote
from .schedulers import BETA, EXPONENTIAL, KARRAS, SGM_UNIFORM, UNIFORM, combine

# ComfyUI's k-diffusion samplers -> A1111's, which run the same algorithm on a schedule the request picks.
# ComfyUI's `ddim` is its Euler sampler (DDIM with eta 0 is Euler's step), on the chosen schedule; the `_gpu`
# variants differ from the plain ones only in where their noise is drawn.
SAMPLERS = {
    "euler": "Euler", "ddim": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
}
# Recognised and refused: no diffusers scheduler here runs them on ComfyUI's schedules (UniPC and LCM run their
# own timesteps here; DPM++ 3M SDE differs from k-diffusion's: sd_core/schedulers.py).
REFUSED_SAMPLERS = ("uni_pc", "uni_pc_bh2", "lcm", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "dpmpp_2s_ancestral",
                    "dpm_fast", "dpm_adaptive", "euler_cfg_pp", "euler_ancestral_cfg_pp", "ipndm", "deis",
                    "heunpp2", "ddpm", "res_multistep", "gradient_estimation")
# ComfyUI's schedulers -> A1111 1.10's schedule types of the same definition (A1111 took them from ComfyUI):
# normal = sigmas at timesteps evenly spaced from the last to 0 = A1111's Uniform (k-diffusion's get_sigmas).
SCHEDULERS = {"normal": UNIFORM, "karras": KARRAS, "exponential": EXPONENTIAL, "sgm_uniform": SGM_UNIFORM,
              "beta": BETA}
# Recognised and refused: diffusers has no equivalent (A1111's Simple, DDIM, KL Optimal, ... are refused too).
REFUSED_SCHEDULERS = ("simple", "ddim_uniform", "linear_quadratic", "kl_optimal")


def scheduler_name(node, sampler: str, scheduler: str) -> str:
    """The engine's sampler name for a KSampler's ``sampler_name`` and ``scheduler``; InvalidRequest naming the
    node, sampler and scheduler when there is no exact equivalent."""
    if sampler not in SAMPLERS:
        why = "has no equivalent in this worker" if sampler in REFUSED_SAMPLERS else "is unknown"
        raise node.error(f"sampler_name {quote(sampler, 40)} {why}; supported: {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        why = "has no equivalent in this worker" if scheduler in REFUSED_SCHEDULERS else "is unknown"
        raise node.error(f"scheduler {quote(scheduler, 40)} {why} (with sampler_name {sampler!r}); supported: "
                         f"{', '.join(SCHEDULERS)}")
    try:
        return combine(SAMPLERS[sampler], SCHEDULERS[scheduler])
    except InvalidRequest:
        runs = [name for name, label in SCHEDULERS.items() if _runs(SAMPLERS[sampler], label)]
        raise node.error(f"sampler_name {sampler!r} with scheduler {scheduler!r} is not supported; {sampler!r} "
                         f"runs with {', '.join(runs)}") from None


def _runs(sampler: str, schedule: str) -> bool:
    try:
        combine(sampler, schedule)
    except InvalidRequest:
        return False
    return True
