"""A1111's `alwayson_scripts` (extension units): disabled units are accepted, enabled ones refused by extension
(except ControlNet's, which sd_core/a1111_controlnet.py translates)."""

from __future__ import annotations

from .a1111_controlnet import is_controlnet
from .schema import field_label

MAX_LISTED = 5  # extensions named in one error; the rest are counted
FIELD = "alwayson_scripts"


def _off(value) -> bool:
    return value is None or value is False or value in (0, "") or value == [] or value == {}


def _unit_enabled(unit) -> bool:
    """One unit: a dict runs unless its "enabled" is off (ControlNet's units default to enabled)."""
    if isinstance(unit, dict):
        return not _off(unit.get("enabled", True))
    return not _off(unit)


def enabled(entry) -> bool:
    """Whether an extension's entry (``{"args": [...]}``) switches it on.

    No args (or none at all) is off. A bool first arg is the extension's own switch (ADetailer, Dynamic Prompts,
    Regional Prompter, ... put it there): off when false, whatever follows. Otherwise the args are units
    (ControlNet): off only when every unit is. Anything else counts as on, so it is refused rather than dropped.
    """
    args = entry.get("args") if isinstance(entry, dict) else entry
    if _off(args):
        return False
    if not isinstance(args, list):
        return True
    if isinstance(args[0], bool):
        return args[0]
    return any(_unit_enabled(unit) for unit in args)


def refusals(scripts) -> list[str]:
    """Error messages for ``alwayson_scripts``: one per extension switched on that this worker does not have."""
    if _off(scripts):
        return []
    if not isinstance(scripts, dict):
        return [f"{FIELD}: expected a JSON object {{extension: {{\"args\": [...]}}}}, got {type(scripts).__name__}"]
    on = [name for name, entry in scripts.items() if enabled(entry) and not is_controlnet(name)]
    errors = [f"{FIELD}.{field_label(name)}: not supported by this worker" for name in on[:MAX_LISTED]]
    if len(on) > MAX_LISTED:
        errors.append(f"{FIELD}: {len(on) - MAX_LISTED} more extensions not supported by this worker")
    return errors
