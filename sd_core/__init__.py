"""sd_core: the Stable Diffusion engine shared by the Cog and RunPod adapters (no platform imports here)."""

from .errors import InvalidRequest, SDError
from .settings import Settings

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "InvalidRequest", "SDError", "Settings", "parse_request"]

# Loaded when first asked for: Engine pulls in torch and diffusers (seconds of import time); the request schema pulls
# in pydantic (~0.3 s of CPU), which a fetch-only process (sd_core.storage: preload, warm_cache) never needs.
_LAZY = {"Engine": "engine", "GenerationRequest": "schema", "GenerationResult": "schema", "parse_request": "schema"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
