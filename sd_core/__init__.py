"""sd_core: the Stable Diffusion engine shared by the Cog and RunPod adapters (no platform imports here)."""

from .errors import InvalidRequest, SDError
from .schema import GenerationRequest, GenerationResult, parse_request
from .settings import Settings

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "InvalidRequest", "SDError", "Settings", "parse_request"]


def __getattr__(name: str):
    # Engine pulls in torch and diffusers (seconds of import time): load it only when asked for.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
