"""ControlNet control modes and passes: soft injection ("My prompt is more important"), the units of each hires pass."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from .errors import InvalidRequest, quote

# A1111's ControlNet extension (scripts/hook.py), in its soft-injection mode: each of a ControlNet's residuals i
# (the encoder's, then the middle block's) is scaled by the unit's weight * SOFT_BASE ** (SOFT_TOP - i). SD1.x has
# 13 residuals (the middle one at 1.0); SDXL has 10 and keeps the first 10 of the same list (its middle at 0.825**3).
SOFT_BASE = 0.825
SOFT_TOP = 12
# Preprocessors whose units the extension always soft-injects in a hires fix's second pass ('canny' or 'mlsd' in
# the module's name), to reduce artefacts at the higher resolution.
HIRES_SOFT_PREPROCESSORS = ("canny", "mlsd")


def soft_scales(count: int) -> list[float]:
    """The per-residual factors of soft injection for a ControlNet with ``count`` residuals (down ones + the middle)."""
    return [SOFT_BASE ** float(SOFT_TOP - i) for i in range(count)]


def _scaled(output):
    """A ControlNet's forward output (tuple, or ControlNetOutput) with its residuals scaled by ``soft_scales``."""
    if isinstance(output, tuple):
        down, mid = output
    else:
        down, mid = output.down_block_res_samples, output.mid_block_res_sample
    factors = soft_scales(len(down) + 1)
    down = tuple(sample * factor for sample, factor in zip(down, factors, strict=False))
    mid = mid * factors[len(down)]
    if isinstance(output, tuple):
        return down, mid
    return type(output)(down_block_res_samples=down, mid_block_res_sample=mid)


def controlnet_modules(pipe) -> list:
    """The ControlNet modules of a ControlNet pipeline, in unit order (one, or a MultiControlNet's nets)."""
    held = pipe.controlnet
    return list(getattr(held, "nets", [held]))


@contextlib.contextmanager
def soft_injection(pipe, controls) -> Iterator[None]:
    """Within the block, the ControlNets of ``controls`` with ``soft`` set scale their residuals as the extension's
    "My prompt is more important" does (forward hooks, removed afterwards; used under the GPU lock). The unit's own
    weight stays diffusers' conditioning scale, which multiplies every residual."""
    if not controls:
        yield
        return
    soft: dict[int, tuple[object, bool]] = {}
    for module, control in zip(controlnet_modules(pipe), controls, strict=True):
        if soft.setdefault(id(module), (module, control.soft))[1] != control.soft:
            raise InvalidRequest(f"ControlNet {quote(control.name)} is used by two units, one soft-injected (My prompt "
                                 "is more important, or canny in a hires pass) and one not: a ControlNet "
                                 "runs in one way per call here", field=control.field)
    hooks = []
    try:
        for module, on in soft.values():
            if on:
                hooks.append(module.register_forward_hook(lambda _module, _args, output: _scaled(output)))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def first_pass(controls: tuple, hires: bool) -> tuple:
    """The units of the first (or only) pass: without a hires fix all of them (the extension ignores hr_option)."""
    return tuple(c for c in controls if not hires or c.hires_option != "high_res_only")


def second_pass(controls: tuple) -> tuple:
    """The units of a hires fix's second pass, with their control maps at the final size; a canny unit is
    soft-injected there as the extension does (a balanced one: "control" is diffusers' guess_mode here)."""
    return tuple(dataclasses.replace(c, image=c.hires_image, soft=c.soft or (not c.guess_mode and any(
        name in c.preprocessor for name in HIRES_SOFT_PREPROCESSORS))) for c in controls
        if c.hires_option != "low_res_only")
