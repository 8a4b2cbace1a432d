"""Model families, one module each: the registry the engine, pipelines and manifests ask for anything family-specific.

Adding a family (SD3.5, FLUX, ...) = one module here defining ``FAMILY`` (a ``ModelFamily``, or a subclass overriding
the hooks it needs) and listed in ``FAMILIES``, plus its tiny random-weight model in ``devtools/tiny_models.py`` and a
manifest in ``models/``. Nothing else branches on the architecture.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ManifestError
from . import flux, flux_fill, sd2, sd15, sdxl, sdxl_refiner
from .base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {module.FAMILY.name: module.FAMILY
                                    for module in (sd15, sd2, sdxl, sdxl_refiner, flux, flux_fill)}
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
