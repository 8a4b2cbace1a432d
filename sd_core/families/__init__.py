"""Model families, one module each: the registry the engine, pipelines and manifests ask for anything family-specific.

Adding a family = one module here defining ``FAMILY`` (a ``ModelFamily``, or a subclass overriding the hooks it
needs) and listed in ``FAMILIES``, plus its tiny random-weight model (``devtools/tiny_<family>.py``) and a manifest in
``models/``. Nothing else branches on the architecture. The hooks (``base.ModelFamily``):

- data: pipelines, defaults (``scheduler``; ``max_sequence_length`` for T5 families), ``denoiser`` (unet or
  transformer), ``cuda_dtype``, ``optional_components`` (what a manifest's ``skip_components`` may leave out);
- ``features``: the engine features its models run (constants in ``base``). The one place that refuses the others is
  ``sd_core/family_features.check_request`` (engine stage 1, before anything is fetched): "<field>: <model> is a
  <family> model, which ..."; it also turns escaped-bracket prompts into plain text for families without A1111
  prompt syntax. Schedulers a family does not run (``schedulers()``) are refused by ``Engine.resolve``;
- methods: ``prompt_kwargs``, ``clip_skip_limit``, ``schedulers`` / ``build_scheduler`` (``flow_match.py``: SD3 and
  FLUX, Euler only), ``call_kwargs(job)`` (extra pipeline arguments), ``infotext_fields(job)``, ``detect``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ManifestError
from . import flux, flux_fill, sd2, sd3, sd15, sdxl, sdxl_refiner
from .base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {module.FAMILY.name: module.FAMILY
                                    for module in (sd15, sd2, sdxl, sdxl_refiner, flux, sd3, flux_fill)}
NAMES: tuple[str, ...] = tuple(FAMILIES)

__all__ = ["FAMILIES", "NAMES", "ModelFamily", "detect_architecture", "family"]


def family(architecture: str) -> ModelFamily:
    """The family of a manifest's ``architecture``."""
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ManifestError(f"unknown architecture {architecture!r}; known: {', '.join(NAMES)}") from None


def detect_architecture(keys: Iterable[str]) -> str | None:
    """The family of a single-file checkpoint, from its state-dict keys; None when no family (or several) match."""
    keys = list(keys)
    found = [name for name, candidate in FAMILIES.items() if candidate.detect(keys)]
    return found[0] if len(found) == 1 else None
