"""A1111 sampler and schedule names, and how each pair maps onto a diffusers scheduler class plus config flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest, quote

UNIFORM, KARRAS, EXPONENTIAL, BETA = "Uniform", "Karras", "Exponential", "Beta"
SGM_UNIFORM, AYS, NORMAL = "SGM Uniform", "Align Your Steps", "Normal"
_ALL = (UNIFORM, KARRAS, EXPONENTIAL, BETA, SGM_UNIFORM)
_SIGMA_SCHEDULES = (KARRAS, EXPONENTIAL, BETA)  # diffusers' sigma flags
_FLAGGED = (UNIFORM, *_SIGMA_SCHEDULES, NORMAL)  # what a sampler with the flags but no custom sigmas runs exactly


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its diffusers class and flags, the schedules it runs, and A1111's "Automatic" schedule."""

    cls: str
    flags: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = (UNIFORM,)
    automatic: str = UNIFORM  # the schedule A1111 1.9+ picks for `scheduler: "Automatic"` (or none given)
    # eta: None = the sampler adds no noise (eta has no effect, as in A1111); else the default amount of noise,
    # which the request may change only where diffusers' scheduler takes `eta` (``eta_adjustable``).
    eta: float | None = None
    eta_adjustable: bool = False


# A1111's k-diffusion samplers place their schedules over the model's whole sigma range (sigma_max = the last
# training timestep's, about 14.61 for SD 1.5 / SDXL), whatever the model's own `timestep_spacing`: diffusers'
# "linspace" spacing does the same (Uniform: timesteps evenly spaced from the last to 0, within 1e-4 of k-diffusion's
# log-sigma interpolation; Karras / Exponential / Beta: bounded by the first and last training sigmas).
_K = {"timestep_spacing": "linspace"}
# A1111 runs DDIM and PLMS on timesteps 1, 1 + 1000 // steps, ... whatever the model says: diffusers' "leading" + 1.
_TIMESTEPS = {"timestep_spacing": "leading", "steps_offset": 1}

# A1111 1.10 sampler name -> diffusers equivalent (flags follow diffusers' scheduler overview and k-diffusion).
SAMPLERS: dict[str, Sampler] = {
    # the only one taking `sigmas=` (SGM Uniform, Align Your Steps, Normal: A1111's sigmas passed to the pipeline)
    "Euler": Sampler("EulerDiscreteScheduler", _K, schedules=(*_ALL, AYS, NORMAL)),
    # diffusers has no sigma flags and no custom sigmas for Euler a: the Uniform schedule only
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", _K, schedules=(UNIFORM, NORMAL), eta=1.0),
    # no custom sigmas: SGM Uniform's fractional timesteps cannot be given
    "Heun": Sampler("HeunDiscreteScheduler", _K, schedules=_FLAGGED),
    "LMS": Sampler("LMSDiscreteScheduler", _K, schedules=_FLAGGED),
    # DPM-Solver++ takes whole timesteps only: its Uniform / SGM Uniform schedules are rounded ones, not A1111's
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", _K, schedules=_SIGMA_SCHEDULES, automatic=KARRAS),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {**_K, "algorithm_type": "sde-dpmsolver++"},
                            schedules=_SIGMA_SCHEDULES, automatic=EXPONENTIAL, eta=1.0),
    "DPM++ 2M SDE Heun": Sampler("DPMSolverMultistepScheduler",
                                 {**_K, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
                                 schedules=_SIGMA_SCHEDULES, automatic=EXPONENTIAL, eta=1.0),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", _K, schedules=_FLAGGED, automatic=KARRAS, eta=1.0),
    # A1111 runs these four on their own timesteps and ignores the schedule type.
    "DDIM": Sampler("DDIMScheduler", _TIMESTEPS, eta=0.0, eta_adjustable=True),
    "PLMS": Sampler("PNDMScheduler", {**_TIMESTEPS, "skip_prk_steps": True}),
    # A1111's UniPC options: variant bh1, order 3, lower order final, time-uniform steps from the last training
    # timestep down to timestep 0 (its sigma, not 0, is the last): diffusers' "linspace" + final sigma_min, whose
    # timesteps are whole numbers (A1111's are fractional unless steps divides 999: docs/api.md).
    "UniPC": Sampler("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True,
                                                 "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
    "LCM": Sampler("LCMScheduler"),
    # Not in A1111 1.10: diffusers' Trajectory Consistency Distillation sampler (TCD LoRAs); eta is its gamma.
    "TCD": Sampler("TCDScheduler", eta=0.3, eta_adjustable=True),
}

# Schedule type -> sigma flags. A scheduler gets every flag its class takes, the others set to their neutral value
# (``_NEUTRAL``), so a model whose own scheduler config turns one on never leaks it into another schedule.
SCHEDULES: dict[str, dict[str, bool]] = {
    UNIFORM: {},
    KARRAS: {"use_karras_sigmas": True},  # k-diffusion's get_sigmas_karras, rho 7
    EXPONENTIAL: {"use_exponential_sigmas": True},
    BETA: {"use_beta_sigmas": True},  # diffusers' and A1111's beta schedule: alpha = beta = 0.6
    SGM_UNIFORM: {},  # A1111's sigmas passed to the pipeline: sgm_uniform_schedule() (Euler only)
    AYS: {},  # likewise: ays_schedule()
    NORMAL: {},  # A1111's Normal is its Uniform; Euler gets the sigmas themselves: normal_schedule()
}
# Align Your Steps: A1111's 11 sigmas per model family (the family picks: ModelFamily.ays_sigmas), log-linearly
# interpolated to the step count, then 0 appended (A1111 1.10's ays_11_sigmas / ays_32_sigmas).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# Schedule choices a model's scheduler config may make that would move the sigmas off A1111's: reset wherever the
# class takes them (the sampler's and schedule's flags then apply on top). What describes the model itself
# (prediction type, flow or continuous-time sigmas, sigma bounds) is kept.
_NEUTRAL = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_lu_lambdas": False, "final_sigmas_type": "zero", "interpolation_type": "linear"}
_PASSED_SIGMAS = (SGM_UNIFORM, AYS, NORMAL)  # schedules whose sigmas Euler gets from pipeline_kwargs()

# A1111 1.10 names this worker cannot run faithfully (no diffusers equivalent): refused, never approximated.
# DPM++ 3M SDE: diffusers' third-order sde-dpmsolver++ step weighs the second difference with (phi - 0.5) where
# k-diffusion's sample_dpmpp_3m_sde has (phi + 0.5), and drops to lower orders for the last steps: not the same.
# DPM2 / DPM2 a: A1111 builds their schedule for steps + 1 and drops the next-to-last sigma; diffusers'
# KDPM2 schedulers take neither custom sigmas nor that option.
NOT_RUNNABLE = ("DPM++ 2S a", "DPM++ 3M SDE", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")
# A1111 1.10's other schedule types, recognised to say they are not supported (rather than "unknown sampler"):
# diffusers has no Polyexponential or KL Optimal sigmas, and Simple / DDIM pick timesteps its spacings only
# approximate.
OTHER_A1111_SCHEDULES = ("Polyexponential", "KL Optimal", "Simple", "DDIM")


def _name(sampler: str, schedule: str) -> str:
    return sampler if schedule == UNIFORM else f"{sampler} {schedule}"


# Canonical names: the sampler alone (Uniform schedule, as A1111 before 1.9) or "<sampler> <schedule>".
SCHEDULER_NAMES: tuple[str, ...] = tuple(_name(n, s) for n, sampler in SAMPLERS.items() for s in sampler.schedules)

_SAMPLER_KEYS = {name.lower(): name for name in SAMPLERS}
_SCHEDULE_KEYS = {label.lower(): label for label in (*SCHEDULES, *OTHER_A1111_SCHEDULES)}
# Spellings other clients send (A1111's internal k-diffusion names, lower case) -> a name with an optional schedule.
SAMPLER_ALIASES = {
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "euler_a": "Euler a",
    "k_heun": "Heun", "k_lms": "LMS", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_karras": "DPM++ 2M Karras", "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_sde_karras": "DPM++ SDE Karras", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_lcm": "LCM",
}


def schedule_label(value: str) -> str | None:
    """A1111's label for a schedule type, given as its label or its name in any case (``"karras"``, ``"sgm_uniform"``
    -> ``"Karras"``, ``"SGM Uniform"``); None when A1111 has none."""
    return _SCHEDULE_KEYS.get(" ".join(value.replace("_", " ").split()).lower())


def split_name(name: str) -> tuple[str, str | None]:
    """(sampler, schedule the name spells or None): ``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``.

    Any case and A1111's internal aliases are accepted; InvalidRequest (listing the valid names) otherwise.
    """
    key = " ".join(name.split()).lower()
    key = SAMPLER_ALIASES.get(key, key).lower()
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], None
    for label in sorted(_SCHEDULE_KEYS, key=len, reverse=True):  # "sgm uniform" before "uniform"
        base = key.removesuffix(" " + label)
        if base != key and base in _SAMPLER_KEYS:
            return _SAMPLER_KEYS[base], _SCHEDULE_KEYS[label]
    valid = f"valid: {', '.join(SCHEDULER_NAMES)}"
    if any(key == n.lower() or key.startswith(n.lower() + " ") for n in NOT_RUNNABLE):
        raise InvalidRequest(f"{quote(name)} is an A1111 sampler with no faithful diffusers equivalent here; {valid}",
                             field="scheduler")
    raise InvalidRequest(f"unknown scheduler {quote(name)}; {valid}", field="scheduler")


def combine(sampler: str, schedule: str) -> str:
    """The canonical name for ``sampler`` run with ``schedule``; InvalidRequest naming both when not supported."""
    supported = SAMPLERS[sampler].schedules
    if schedule not in supported:
        why = " (diffusers has no equivalent)" if schedule in OTHER_A1111_SCHEDULES else ""
        gap = "; diffusers cannot run that pair with A1111's sigmas" if schedule in SCHEDULES else ""
        raise InvalidRequest(f"sampler {sampler!r} with schedule {schedule!r} is not supported{why}; {sampler!r} takes "
                             f"{', '.join(supported)} (or Automatic = {SAMPLERS[sampler].automatic}){gap}",
                             field="scheduler")
    return _name(sampler, schedule)


def canonical_name(name: str) -> str:
    """The canonical name for ``name``; a sampler without a schedule runs the Uniform one (A1111 before 1.9)."""
    sampler, schedule = split_name(name)
    return combine(sampler, schedule or UNIFORM)


def checked_name(name: str) -> str:
    """``canonical_name`` for pydantic validators: a ValueError carrying the reason instead of InvalidRequest."""
    try:
        return canonical_name(name)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def build_scheduler(name: str, base_config: dict[str, Any], steps: int | None = None):
    """Build the scheduler ``name`` from a loaded pipeline's scheduler config (one object, nothing else), for runs of
    ``steps`` steps where that matters (one step: see below; None = more than one)."""
    import inspect

    import diffusers

    sampler_name, schedule = split_name(canonical_name(name))
    sampler = SAMPLERS[sampler_name]
    cls = getattr(diffusers, sampler.cls)
    takes = inspect.signature(cls.__init__).parameters
    flags = {key: value for key, value in _NEUTRAL.items() if key in takes} | sampler.flags
    flags |= SCHEDULES[schedule or UNIFORM]
    if steps == 1 and flags.get("timestep_spacing") == "linspace":
        # numpy's linspace(0, T - 1, 1) is [0]: diffusers' "linspace" runs a single step at the last timestep
        # (sigma_min, a nearly unchanged noise image), where A1111's one step is at sigma_max (SDXL Turbo's 1-step
        # use). "trailing" gives that one timestep, T - 1, and the Karras/exponential/beta ranges built on it.
        flags["timestep_spacing"] = "trailing"
    scheduler = cls.from_config(base_config, **flags)
    # from_config silently drops keyword arguments it does not know: make a typo in the tables fail loudly.
    for key, value in flags.items():
        if scheduler.config.get(key) != value:
            raise RuntimeError(f"scheduler {name!r}: {sampler.cls} ignored flag {key}={value!r}")
    return scheduler


def check_eta(name: str, eta: float | None) -> None:
    """InvalidRequest naming sampler and eta when ``name`` cannot run with ``eta`` (None: the sampler's default)."""
    sampler_name, _ = split_name(name)
    sampler = SAMPLERS[sampler_name]
    if eta is None or sampler.eta is None or sampler.eta_adjustable or eta == sampler.eta:
        return
    takes = [n for n, s in SAMPLERS.items() if s.eta_adjustable]
    raise InvalidRequest(f"sampler {sampler_name!r} runs only with eta {sampler.eta:g} here (diffusers' scheduler has "
                         f"no eta), got {eta:g}; eta is adjustable for {', '.join(takes)}", field="eta")


def pipeline_kwargs(name: str, steps: int, eta: float | None, ays_sigmas: tuple[float, ...],
                    scheduler=None) -> dict[str, Any]:
    """What the scheduler ``name`` adds to the ``pipe(...)`` call: the sigmas of SGM Uniform, Align Your Steps and
    Normal on Euler (SGM Uniform and Normal read the model's training sigmas from ``scheduler``, the pipeline's), an
    adjustable eta."""
    sampler_name, schedule = split_name(name)
    sampler, kwargs = SAMPLERS[sampler_name], {}
    if sampler.cls == "EulerDiscreteScheduler" and schedule in _PASSED_SIGMAS:
        if schedule == AYS:
            kwargs["sigmas"] = ays_schedule(ays_sigmas, steps)
        elif schedule == NORMAL:
            kwargs["sigmas"] = normal_schedule(scheduler.alphas_cumprod, steps)
        else:
            kwargs["sigmas"] = sgm_uniform_schedule(scheduler.alphas_cumprod, steps)
    if sampler.eta_adjustable:
        kwargs["eta"] = sampler.eta if eta is None else eta
    return kwargs


def ays_schedule(table: tuple[float, ...], steps: int) -> list[float]:
    """``steps`` + 1 sigmas: ``table`` log-linearly interpolated to ``steps`` points, then 0 (as A1111)."""
    import numpy as np

    if steps == len(table):
        return [*table, 0.0]
    xs = np.linspace(0, 1, len(table))
    ys = np.log(np.asarray(table)[::-1])
    sigmas = np.exp(np.interp(np.linspace(0, 1, steps), xs, ys))[::-1]
    return [*(float(s) for s in sigmas), 0.0]


def normal_schedule(alphas_cumprod, steps: int) -> list[float]:
    """A1111's Uniform and Normal schedule (= ComfyUI's normal): ``steps`` sigmas at timesteps evenly spaced from the
    last training timestep to 0 (the model's sigmas interpolated log-linearly between whole timesteps, as
    k-diffusion), then 0."""
    import numpy as np

    return [*_sigmas_at(alphas_cumprod, np.linspace(len(alphas_cumprod) - 1, 0, steps)), 0.0]


def sgm_uniform_schedule(alphas_cumprod, steps: int) -> list[float]:
    """A1111's SGM Uniform: ``steps`` + 1 timesteps evenly spaced from the last training timestep to 0, the last
    dropped, their sigmas (interpolated as ``normal_schedule``), then 0."""
    import numpy as np

    return [*_sigmas_at(alphas_cumprod, np.linspace(len(alphas_cumprod) - 1, 0, steps + 1)[:-1]), 0.0]


def _sigmas_at(alphas_cumprod, timesteps) -> list[float]:
    """The model's sigma at (fractional) ``timesteps``: log sigma interpolated linearly between whole timesteps."""
    import numpy as np

    cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    log_sigmas = np.log(((1 - cumprod) / cumprod) ** 0.5)
    low = np.floor(timesteps).astype(int)
    high = np.ceil(timesteps).astype(int)
    weight = timesteps - low
    return [float(s) for s in np.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[high])]
