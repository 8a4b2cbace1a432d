"""A1111's ControlNet-extension IP-Adapter units -> native `ip_adapters` entries (light: on the adapters' path)."""

from __future__ import annotations

from .checkpoints import title_to_name
from .errors import InvalidRequest, quote
from .schema import IpAdapterSpec, field_label

FACE_ID_MARKERS = ("faceid", "face_id", "face-id", "pulid")
FACE_ID_REASON = ("FaceID IP-Adapters need face embeddings from insightface, which this worker does not have; use a "
                  "plain IP-Adapter (a style or subject reference image)")


def is_face_id(name: str | None) -> bool:
    lowered = (name or "").lower()
    return any(marker in lowered for marker in FACE_ID_MARKERS)


# Unit keys that do not change an IP-Adapter's image (preprocessor resolution and thresholds, UI and saving flags).
_UNIT_IGNORED = frozenset({
    "enabled", "module", "model", "weight", "image", "input_image", "resize_mode", "low_vram", "processor_res",
    "threshold_a", "threshold_b", "pixel_perfect", "save_detected_map", "hr_option", "is_ui", "loopback",
    "output_dir", "use_preview_as_input", "generated_image", "union_control_type", "input_mode", "batch_modifiers",
    "animatediff_batch", "batch_image_dir", "batch_mask_dir", "batch_input_gallery", "batch_mask_gallery",
    "inpaint_crop_input_image", "pulid_mode",
})
# Unit keys honoured only at the extension's defaults (anything else changes the image in ways not built here).
_UNIT_DEFAULTS = {
    "guidance_start": (0, 0.0), "guidance_end": (1, 1.0), "control_mode": (0, "Balanced", "balanced"),
    "mask": (None, "", False), "mask_image": (None, "", False), "effective_region_mask": (None, "", False),
    "ipadapter_input": (None, [], False), "advanced_weighting": (None, [], False), "batch_images": (None, "", []),
}


def is_ip_adapter_unit(unit) -> bool:
    """A ControlNet unit whose preprocessor (module) is one of the extension's IP-Adapter ones."""
    return isinstance(unit, dict) and str(unit.get("module") or "").lower().startswith("ip-adapter")


def _model_name(value) -> str | None:
    """The extension's model name ("ip-adapter_sd15 [6a3f6166]", "ip-adapter_sd15.safetensors") -> manifest name."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if not isinstance(value, str) or len(value) > 300:
        raise InvalidRequest(f"expected an IP-Adapter model name, got {quote(value)}", field="model")
    return title_to_name(value) or None


def a1111_unit_to_spec(unit) -> IpAdapterSpec | None:
    """One ControlNet extension unit -> a native ``ip_adapters`` entry; None when it is no enabled IP-Adapter unit.

    Honoured: ``image`` (or ``input_image``; a ``{"image": ...}`` dict too), ``weight`` (the scale) and ``model``
    (the manifest IP-Adapter's name, A1111's " [hash]" and file extension dropped). FaceID modules are refused,
    and so are keys that would change the image otherwise (guidance_start/end, control_mode, masks) unless at their
    defaults. InvalidRequest names the unit's key (``"weight: ..."``); the caller prefixes where the unit is.
    """
    if not is_ip_adapter_unit(unit) or unit.get("enabled", True) in (False, None, 0, ""):
        return None
    module = str(unit.get("module"))
    if is_face_id(module) or is_face_id(str(unit.get("model") or "")):
        raise InvalidRequest(f"{quote(module)}: {FACE_ID_REASON}", field="module")
    for key in unit:
        if key not in _UNIT_IGNORED and key not in _UNIT_DEFAULTS:
            raise InvalidRequest("unknown ControlNet unit key for an IP-Adapter unit", field=field_label(key))
    for key, defaults in _UNIT_DEFAULTS.items():
        value = unit.get(key)
        if value is not None and (isinstance(value, bool) and value is not False or value not in defaults):
            raise InvalidRequest(f"only the extension's default ({quote(defaults[0])}) is supported for an "
                                 f"IP-Adapter unit, got {quote(value)}", field=key)
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):
        if image.get("mask") not in (None, "", False):
            raise InvalidRequest("a mask on an IP-Adapter image is not supported", field="image.mask")
        image = image.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InvalidRequest("an IP-Adapter unit needs its reference image (base64, data URI or https URL)",
                             field="image")
    weight = unit.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise InvalidRequest(f"expected a number, got {quote(weight)}", field="weight")
    from pydantic import ValidationError

    from .schema import describe_validation_error

    try:
        return IpAdapterSpec(model=_model_name(unit.get("model")), image=image, scale=weight)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc, {"scale": "weight"})) from None
