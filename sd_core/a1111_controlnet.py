"""A1111's ControlNet extension units (``alwayson_scripts.controlnet.args``) -> native ``controlnets`` units."""

from __future__ import annotations

from pydantic import ValidationError

from .a1111_ip_adapter import is_ip_adapter_unit
from .checkpoints import title_to_name
from .errors import quote
from .preprocessor_names import canonical, unavailable
from .schema import MAX_CONTROLNETS, ControlNetUnit, describe_validation_error, field_label

SCRIPT = "controlnet"  # the extension's name in alwayson_scripts (A1111 matches it case-insensitively)
MAX_MODEL_CHARS = 300
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control", "balanced": "balanced",
                 "my prompt is more important": "prompt", "controlnet is more important": "control"}
RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill", "just resize": "just_resize",
                "crop and resize": "crop_and_resize", "inner fit (scale to fit)": "crop_and_resize",
                "scale to fit (inner fit)": "crop_and_resize", "resize and fill": "resize_and_fill",
                "envelope (outer fit)": "resize_and_fill"}
HR_OPTIONS = {"both": "both", "low res only": "low_res_only", "high res only": "high_res_only", 0: "both",
              1: "low_res_only", 2: "high_res_only"}  # the extension's HiResFixOption (values, or their index)
# The extension's union_control_type (its ControlNetUnionControlType values, and the tags it maps to them) -> the
# native control_type; "Unknown" (its default) is no control type.
UNION_TYPES = {"openpose": "openpose", "depth": "depth", "soft edge": "softedge", "softedge": "softedge",
               "scribble": "softedge", "hard edge": "canny", "canny": "canny", "lineart": "canny", "mlsd": "canny",
               "normal map": "normal", "normalmap": "normal", "segmentation": "segment", "tile": "tile",
               "blur": "tile", "inpaint": "inpaint", "unknown": None}
DEFAULT_PROCESSOR_RES = 512  # the extension's default (its -1)
DEFAULT_THRESHOLDS = (100, 200)  # canny's low/high (threshold_a/b's -1)
MLSD_THRESHOLDS = (0.1, 0.1)  # mlsd's value/distance thresholds (threshold_a/b's -1)
# Unit keys accepted without effect on the image: memory hints, saving, the UI's own state. Anything else that is not
# translated below is refused by name.
HARMLESS = {"lowvram": None, "low_vram": None, "save_detected_map": None, "is_ui": None,
            "input_mode": ("simple", 0), "loopback": (False, 0), "batch_images": ("", None),
            "use_preview_as_input": (False, 0), "generated_image": (None, ""), "advanced_weighting": (None,),
            "effective_region_mask": (None, "")}
NAMES = {"hires_option": "hr_option", "control_type": "union_control_type", "scale": "weight",
         "start": "guidance_start", "end": "guidance_end", "mode": "control_mode",
         "preprocessor": "module", "low_threshold": "threshold_a", "high_threshold": "threshold_b",
         "value_threshold": "threshold_a", "distance_threshold": "threshold_b"}


def is_controlnet(name) -> bool:
    return isinstance(name, str) and name.strip().lower() == SCRIPT


def model_name(value) -> str | None:
    """An A1111 ControlNet model name ("control_v11p_sd15_canny [d14c016b]") -> the manifest name."""
    if not isinstance(value, str) or len(value) > MAX_MODEL_CHARS:
        return None
    name = title_to_name(value)
    return name if name and name.lower() != "none" else None


def _on(value) -> bool:
    return not (value is None or value is False or value in (0, "") or value == [] or value == {})


def units(scripts, errors: list[str]) -> list[dict]:
    """The enabled units of ``alwayson_scripts``' ControlNet entry as native unit dicts; problems go to ``errors``,
    named by A1111's keys (``alwayson_scripts.controlnet.args.0.weight: ...``)."""
    if not isinstance(scripts, dict):
        return []
    found = [(name, entry) for name, entry in scripts.items() if is_controlnet(name)]
    if not found:
        return []
    name, entry = found[0]
    args = entry.get("args") if isinstance(entry, dict) else entry
    where = f"alwayson_scripts.{field_label(name)}.args"
    if not _on(args):
        return []
    if not isinstance(args, list):
        errors.append(f"{where}: expected a list of units")
        return []
    translated = []
    for index, unit in enumerate(args):
        prefix = f"{where}.{index}"
        if not isinstance(unit, dict):
            if _on(unit):
                errors.append(f"{prefix}: expected a unit object (JSON object with the extension's keys)")
            continue
        if not _on(unit.get("enabled", True)) or is_ip_adapter_unit(unit):
            continue  # IP-Adapter units become `ip_adapters` entries (sd_core/a1111_scripts.py)
        native = _unit(unit, prefix, errors)
        if native is not None:
            translated.append(native)
    if len(translated) > MAX_CONTROLNETS:
        errors.append(f"{where}: {len(translated)} enabled units; at most {MAX_CONTROLNETS}")
    return translated


def _unit(unit: dict, prefix: str, errors: list[str]) -> dict | None:
    before = len(errors)
    native: dict = {}
    for key, value in unit.items():
        if key in HARMLESS and (HARMLESS[key] is None or value in HARMLESS[key] or value is None):
            continue
        if key not in ("enabled", "image", "input_image", "mask", "module", "model", "weight", "guidance_start",
                       "guidance_end", "control_mode", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                       "pixel_perfect", "guessmode", "hr_option", "union_control_type"):
            errors.append(f"{prefix}.{field_label(key)}: not supported by this worker")
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
        if _on(image.get("mask")):
            errors.append(f"{prefix}.image.mask: a ControlNet mask is not supported by this worker")
        image = image.get("image")
    if not isinstance(image, str) or not image:
        errors.append(f"{prefix}.image: expected the control image (base64, data URI or https URL)")
    else:
        native["image"] = image
    if _on(unit.get("mask")):
        errors.append(f"{prefix}.mask: a ControlNet mask is not supported by this worker")
    model = model_name(unit.get("model"))
    if model is None:
        errors.append(f"{prefix}.model: expected a ControlNet model name (GET /controlnet/model_list), got "
                      f"{quote(unit.get('model'), 60)}")
    else:
        native["model"] = model
    module = canonical(unit.get("module", "none"))  # the extension's labels and internal names
    if module is None:
        errors.append(f"{prefix}.module: {unavailable(unit.get('module'))}")
    else:
        native["preprocessor"] = module
    for source, target in (("weight", "scale"), ("guidance_start", "start"), ("guidance_end", "end")):
        if unit.get(source) is not None:
            native[target] = unit[source]
    mode = unit.get("control_mode", 0)
    if _on(unit.get("guessmode")):  # the extension's old switch, before control_mode
        mode = 2 if mode in (0, "Balanced") else mode
    mode = _choice(mode, CONTROL_MODES, f"{prefix}.control_mode", errors)
    if mode is not None:
        native["mode"] = mode
    hr_option = _choice(_or(unit.get("hr_option"), "Both"), HR_OPTIONS, f"{prefix}.hr_option", errors)
    if hr_option is not None:
        native["hires_option"] = hr_option
    union = _choice(_or(unit.get("union_control_type"), "Unknown"), UNION_TYPES, f"{prefix}.union_control_type", errors)
    if union is not None:
        native["control_type"] = union
    resize = _choice(unit.get("resize_mode", 1), RESIZE_MODES, f"{prefix}.resize_mode", errors)
    if resize is not None:
        native["resize_mode"] = resize
    if module not in (None, "none"):  # every module but none works at the unit's resolution
        if not _on(unit.get("pixel_perfect")):
            native["processor_res"] = _number(unit.get("processor_res"), DEFAULT_PROCESSOR_RES)
    if module == "canny":  # the modules here with sliders (the extension ignores threshold_a/b for the others)
        native["low_threshold"] = _number(unit.get("threshold_a"), DEFAULT_THRESHOLDS[0])
        native["high_threshold"] = _number(unit.get("threshold_b"), DEFAULT_THRESHOLDS[1])
    elif module == "mlsd":
        native["value_threshold"] = _number(unit.get("threshold_a"), MLSD_THRESHOLDS[0])
        native["distance_threshold"] = _number(unit.get("threshold_b"), MLSD_THRESHOLDS[1])
    if len(errors) > before:
        return None
    try:
        return ControlNetUnit.model_validate(native).model_dump()
    except ValidationError as exc:
        message = describe_validation_error(exc, NAMES)
        errors.extend(f"{prefix}.{part}" for part in message.split("; "))
        return None


def _choice(value, table: dict, field: str, errors: list[str]):
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in table:
        names = ", ".join(repr(k) if isinstance(k, str) else str(k) for k in table)
        errors.append(f"{field}: expected one of {names}; got {quote(value, 40)}")
        return None
    return table[key]


def _number(value, default):
    """The extension's -1 (or nothing) means its default; whole floats become ints (the schema checks the rest)."""
    if value is None or value == -1:
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _or(value, default):
    return default if value is None else value
