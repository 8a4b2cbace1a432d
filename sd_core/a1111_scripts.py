"""A1111's `alwayson_scripts` (extension units): disabled units are accepted; ControlNet's enabled units are
translated (ControlNet units: sd_core/a1111_controlnet.py; IP-Adapter units become `ip_adapters` entries:
sd_core/ip_adapter.py); other enabled extensions are refused by name."""

from __future__ import annotations

from .a1111_controlnet import is_controlnet
from .a1111_ip_adapter import a1111_unit_to_spec, is_ip_adapter_unit
from .errors import InvalidRequest
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


def _controlnet_units(name, entry) -> list | None:
    """The units of ControlNet's entry (``{"args": [unit, ...]}``); None for another extension or another shape."""
    if not isinstance(name, str) or name.lower() != "controlnet":
        return None
    args = entry.get("args") if isinstance(entry, dict) else entry
    return args if isinstance(args, list) and args and not isinstance(args[0], bool) else None


def ip_adapter_specs(scripts) -> tuple[list, list[str]]:
    """ControlNet's enabled IP-Adapter units as native ``ip_adapters`` entries, and error messages for refused ones
    (FaceID, unknown keys, non-default guidance ranges...), each naming the unit (``alwayson_scripts.controlnet.
    args[0].weight: ...``)."""
    specs, errors = [], []
    if not isinstance(scripts, dict):
        return specs, errors
    for name, entry in scripts.items():
        units = _controlnet_units(name, entry)
        if units is None:
            continue  # other extensions: refused by refusals()
        for index, unit in enumerate(units):
            if not _unit_enabled(unit) or not is_ip_adapter_unit(unit):
                continue  # ControlNet units proper: sd_core/a1111_controlnet.py
            try:
                spec = a1111_unit_to_spec(unit)
            except InvalidRequest as exc:
                errors.append(f"{FIELD}.{field_label(name)}.args[{index}].{exc}")
                continue
            if spec is not None:
                specs.append(spec)
    return specs, errors
