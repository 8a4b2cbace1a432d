"""A1111 sampler names and how each maps onto a diffusers scheduler class plus config flags."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest

# A1111 name -> (diffusers scheduler class name, config overrides). Flags follow diffusers' scheduler overview.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ 2S Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
DEFAULT_SCHEDULER = "DPM++ 2M Karras"

# Spellings other clients send (A1111's internal k-diffusion names, lower case) -> canonical name.
_ALIASES = {name.lower(): name for name in SAMPLERS} | {
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_heun": "Heun",
    "k_lms": "LMS",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_karras": "DPM++ 2M Karras",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_sde_karras": "DPM++ SDE Karras",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
}


def canonical_name(name: str) -> str:
    """Return the canonical A1111 name for ``name`` (any case, A1111 internal aliases) or raise InvalidRequest."""
    found = _ALIASES.get(name.strip().lower())
    if found is None:
        raise InvalidRequest(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}", field="scheduler")
    return found


def build_scheduler(name: str, base_config: dict[str, Any]):
    """Build the scheduler ``name`` from a loaded pipeline's scheduler config (one object, nothing else)."""
    import diffusers

    class_name, flags = SAMPLERS[canonical_name(name)]
    scheduler = getattr(diffusers, class_name).from_config(base_config, **flags)
    # from_config silently drops keyword arguments it does not know: make a typo in SAMPLERS fail loudly.
    for key, value in flags.items():
        if scheduler.config.get(key) != value:
            raise RuntimeError(f"scheduler {name!r}: {class_name} ignored flag {key}={value!r}")
    return scheduler
