"""A1111's hires fix keys (txt2img's enable_hr, hr_*) -> GenerationRequest's `hires` (sd_core/hires.py runs it)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from .errors import quote
from .schema import HiresSpec, describe_validation_error

A1111_DEFAULT_HIRES_STRENGTH = 0.75  # A1111's API default for txt2img's denoising_strength (its web UI shows 0.7)
DISTILLED_CFG_DEFAULT = 3.5  # Forge's hr_distilled_cfg (Flux only): accepted at its default
# HiresSpec field -> the A1111 key it comes from, to name A1111's keys in errors.
KEYS = {"scale": "hr_scale", "width": "hr_resize_x", "height": "hr_resize_y", "upscaler": "hr_upscaler",
        "steps": "hr_second_pass_steps", "denoising_strength": "denoising_strength", "prompt": "hr_prompt",
        "negative_prompt": "hr_negative_prompt", "scheduler": "hr_sampler_name", "guidance_scale": "hr_cfg"}
FIELD_NAMES = {f"hires.{field}": key for field, key in KEYS.items()} | {"hires": "enable_hr"}
SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint")  # A1111's "as the first pass"
LEGACY_SIZES = ("firstphase_width", "firstphase_height")  # refused unless 0: A1111's pre-1.0 first-pass size
REFUSED_WITH_HIRES = ("hr_checkpoint_name",)  # with enable_hr: only "Use same checkpoint" (or empty)
DEFAULT_ONLY = {"hr_distilled_cfg": (DISTILLED_CFG_DEFAULT,)}  # with enable_hr: Forge's default only


def hires_spec(p: dict, errors: list[str], sampler: Callable[[dict, list[str]], str | None]) -> HiresSpec | None:
    """The hires fix of an A1111 txt2img payload (None when enable_hr is off); problems appended to ``errors``.

    ``sampler`` is a1111's sampler_name + scheduler reader. As A1111: hr_sampler_name and hr_scheduler default to
    the first pass's sampler_name and scheduler; hr_cfg absent (upstream A1111 has no such key) keeps cfg_scale.
    """
    for key in LEGACY_SIZES:
        if p.get(key) not in (None, 0):
            errors.append(f"{key}: the legacy first-phase size is not supported; send width/height (the first pass) "
                          "and hr_scale or hr_resize_x/hr_resize_y")
    enabled = p.get("enable_hr")
    if enabled is None or enabled is False:
        return None
    if enabled is not True:
        errors.append(f"enable_hr: expected true or false, got {quote(enabled)}")
        return None
    checkpoint = p.get("hr_checkpoint_name")
    if checkpoint is not None and checkpoint not in SAME:
        errors.append(f"hr_checkpoint_name: a second-pass checkpoint is not supported by this worker (got "
                      f"{quote(checkpoint)}); use \"Use same checkpoint\"")
    distilled = p.get("hr_distilled_cfg")
    if distilled is not None and (isinstance(distilled, bool) or distilled != DISTILLED_CFG_DEFAULT):
        errors.append(f"hr_distilled_cfg: only its default ({DISTILLED_CFG_DEFAULT:g}) is supported by this worker "
                      f"(no distilled-guidance models), got {quote(distilled)}")
    fields = {field: p[key] for field, key in KEYS.items() if p.get(key) is not None and field != "scheduler"}
    fields.setdefault("denoising_strength", A1111_DEFAULT_HIRES_STRENGTH)
    for field in ("prompt", "negative_prompt"):
        if fields.get(field) == "":
            del fields[field]
    hr_sampler, hr_schedule = p.get("hr_sampler_name"), p.get("hr_scheduler")
    hr_sampler = None if hr_sampler in SAME else hr_sampler
    hr_schedule = None if hr_schedule in SAME else hr_schedule
    if hr_sampler is not None or hr_schedule is not None:
        found: list[str] = []
        name = sampler({"sampler_name": hr_sampler or p.get("sampler_name") or p.get("sampler_index"),
                        "scheduler": hr_schedule if hr_schedule is not None else p.get("scheduler")}, found)
        errors.extend(f"hr_{error}" if error.startswith("scheduler:") else error for error in found)
        if name is not None:
            fields["scheduler"] = name
    try:
        return HiresSpec.model_validate(fields)
    except ValidationError as exc:
        errors.append(describe_validation_error(exc, KEYS))
        return None
