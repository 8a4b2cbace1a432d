"""A1111 sampler and schedule names, and how each pair maps onto a diffusers scheduler class plus config flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest, quote

UNIFORM, KARRAS, EXPONENTIAL = "Uniform", "Karras", "Exponential"
_ALL = (UNIFORM, KARRAS, EXPONENTIAL)


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its diffusers class and flags, the schedules it runs, and A1111's "Automatic" schedule."""

    cls: str
    flags: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = (UNIFORM,)
    automatic: str = UNIFORM  # the schedule A1111 1.9+ picks for `scheduler: "Automatic"` (or none given)


# A1111 1.10 sampler name -> diffusers equivalent (flags follow diffusers' scheduler overview and k-diffusion).
SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler("EulerDiscreteScheduler", schedules=_ALL),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),  # diffusers has no Karras/Exponential sigmas for it
    "Heun": Sampler("HeunDiscreteScheduler", schedules=_ALL),
    "LMS": Sampler("LMSDiscreteScheduler", schedules=_ALL),
    "DPM2": Sampler("KDPM2DiscreteScheduler", schedules=_ALL, automatic=KARRAS),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", schedules=_ALL, automatic=KARRAS),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", schedules=_ALL, automatic=KARRAS),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
                            schedules=_ALL, automatic=EXPONENTIAL),
    "DPM++ 2M SDE Heun": Sampler("DPMSolverMultistepScheduler",
                                 {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
                                 schedules=_ALL, automatic=EXPONENTIAL),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", schedules=_ALL, automatic=KARRAS),
    # A1111 runs these four on their own timesteps and ignores the schedule type.
    "DDIM": Sampler("DDIMScheduler"),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "LCM": Sampler("LCMScheduler"),
}

# Schedule type -> sigma flags. A scheduler gets every flag its class takes, the others set False, so a model
# whose own scheduler config turns one on never leaks it into another schedule.
SCHEDULES: dict[str, dict[str, bool]] = {
    UNIFORM: {},
    KARRAS: {"use_karras_sigmas": True},
    EXPONENTIAL: {"use_exponential_sigmas": True},
}
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# A1111 1.10 names this worker cannot run faithfully (no diffusers equivalent): refused, never approximated.
NOT_RUNNABLE = ("DPM++ 2S a", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")
# A1111 1.10's other schedule types, recognised to say they are not supported (rather than "unknown sampler").
OTHER_A1111_SCHEDULES = ("Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal",
                         "DDIM", "Beta")


def _name(sampler: str, schedule: str) -> str:
    return sampler if schedule == UNIFORM else f"{sampler} {schedule}"


# Canonical names: the sampler alone (Uniform schedule, as A1111 before 1.9) or "<sampler> <schedule>".
SCHEDULER_NAMES: tuple[str, ...] = tuple(_name(n, s) for n, sampler in SAMPLERS.items() for s in sampler.schedules)

_SAMPLER_KEYS = {name.lower(): name for name in SAMPLERS}
_SCHEDULE_KEYS = {label.lower(): label for label in (*SCHEDULES, *OTHER_A1111_SCHEDULES)}
# Spellings other clients send (A1111's internal k-diffusion names, lower case) -> a name with an optional schedule.
_ALIASES = {
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "euler_a": "Euler a",
    "k_heun": "Heun", "k_lms": "LMS", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_karras": "DPM++ 2M Karras", "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_sde_karras": "DPM++ SDE Karras", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_lcm": "LCM",
}


def schedule_label(value: str) -> str | None:
    """A1111's label for a schedule type in any case (``"karras"`` -> ``"Karras"``); None when A1111 has none."""
    return _SCHEDULE_KEYS.get(" ".join(value.split()).lower())


def split_name(name: str) -> tuple[str, str | None]:
    """(sampler, schedule the name spells or None): ``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``.

    Any case and A1111's internal aliases are accepted; InvalidRequest (listing the valid names) otherwise.
    """
    key = " ".join(name.split()).lower()
    key = _ALIASES.get(key, key).lower()
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
        raise InvalidRequest(f"sampler {sampler!r} with schedule {schedule!r} is not supported; {sampler!r} takes "
                             f"{', '.join(supported)} (or Automatic = {SAMPLERS[sampler].automatic})",
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


def build_scheduler(name: str, base_config: dict[str, Any]):
    """Build the scheduler ``name`` from a loaded pipeline's scheduler config (one object, nothing else)."""
    import inspect

    import diffusers

    sampler_name, schedule = split_name(canonical_name(name))
    sampler = SAMPLERS[sampler_name]
    cls = getattr(diffusers, sampler.cls)
    takes = inspect.signature(cls.__init__).parameters
    flags = {key: False for key in _SIGMA_FLAGS if key in takes} | sampler.flags | SCHEDULES[schedule or UNIFORM]
    scheduler = cls.from_config(base_config, **flags)
    # from_config silently drops keyword arguments it does not know: make a typo in the tables fail loudly.
    for key, value in flags.items():
        if scheduler.config.get(key) != value:
            raise RuntimeError(f"scheduler {name!r}: {sampler.cls} ignored flag {key}={value!r}")
    return scheduler
