"""The ControlNet preprocessor (module) names: the A1111 extension's, what weights each needs (no imports: schema)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import quote


@dataclass(frozen=True)
class Module:
    """One preprocessor: the weights it needs (a manifest entry's name; None: none), its detector's fixed options and
    its sliders (detector argument: the ControlNet unit's field setting it)."""

    weights: str | None
    options: dict = field(default_factory=dict)
    sliders: dict = field(default_factory=dict)


# The extension's module names (its labels; its internal names are ALIASES). none and canny: sd_core/control_images.py;
# lineart_standard: controlnet_aux without weights; the others need their weights file in models/_preprocessors.yaml.
# depth_anything(_v2): sd_core/depth_anything.py (transformers); openpose (body only) and lineart_anime:
# sd_core/preprocessor_nets.py; the others: controlnet_aux's detectors. The extension's modules that need what this
# worker does not install are REFUSED, saying why.
MODULES = {
    "none": Module(None),
    "canny": Module(None),
    "lineart_standard": Module(None),
    "lineart_realistic": Module("lineart"),
    "lineart_coarse": Module("lineart_coarse", {"coarse": True}),
    "softedge_pidinet": Module("pidinet"),
    "softedge_pidisafe": Module("pidinet", {"safe": True}),
    "scribble_pidinet": Module("pidinet", {"scribble": True}),
    "softedge_hed": Module("hed"),
    "softedge_hedsafe": Module("hed", {"safe": True}),
    "scribble_hed": Module("hed", {"scribble": True}),
    "depth_anything": Module("depth_anything"),
    "depth_anything_v2": Module("depth_anything_v2"),
    "mlsd": Module("mlsd", sliders={"thr_v": "value_threshold", "thr_d": "distance_threshold"}),
    "openpose": Module("openpose"),
    "lineart_anime": Module("lineart_anime"),
}
_TORCHVISION = "its face network needs torchvision, which this worker does not install"
_TIMM = "its network needs timm and torchvision, which this worker does not install"
REFUSED = {
    "openpose_hand": "its hand network needs scikit-image, which this worker does not install",
    "openpose_face": _TORCHVISION, "openpose_faceonly": _TORCHVISION,
    "openpose_full": "its hand and face networks need scikit-image and torchvision, which this worker does not install",
    "dw_openpose_full": "DWPose runs ONNX models, which this worker does not run",
    "depth_midas": _TIMM, "depth_leres": _TIMM, "depth_leres++": _TIMM, "depth_zoe": _TIMM, "normal_bae": _TIMM,
}
ALIASES = {"lineart": "lineart_realistic", "pidinet": "softedge_pidinet", "pidinet_safe": "softedge_pidisafe",
           "pidinet_scribble": "scribble_pidinet", "hed": "softedge_hed", "hed_safe": "softedge_hedsafe"}
# the manifest's entry names
WEIGHTS = ("lineart", "lineart_coarse", "pidinet", "hed", "depth_anything", "depth_anything_v2", "mlsd", "openpose",
           "lineart_anime")


def canonical(name) -> str | None:
    """A module name (either spelling, any case) as MODULES names it; None if unknown."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in MODULES else None


def unavailable(name) -> str:
    """Why module ``name`` (not in MODULES) is refused: "'x' is not available on this worker[ (reason)]; available:
    ..." (a request's field error, without the field)."""
    key = name.strip().lower() if isinstance(name, str) else None
    reason = f" ({REFUSED[key]})" if key in REFUSED else ""
    return (f"{quote(name, 40)} is not available on this worker{reason}; available: {', '.join(MODULES)} "
            "(weight-based ones: with their weights listed)")


def slider_options(name: str, unit) -> dict:
    """The detector arguments that module ``name``'s sliders take from a ControlNet ``unit`` (mlsd's thresholds)."""
    return {argument: getattr(unit, attribute) for argument, attribute in MODULES[name].sliders.items()}
