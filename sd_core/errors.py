"""The exceptions sd_core raises: each one carries a message a user can act on, and the field it is about."""

from __future__ import annotations


class SDError(Exception):
    """Base of every error sd_core raises on purpose. ``str()`` gives ``"<field>: <reason>"``."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidRequest(SDError):
    """The request itself is wrong (a value out of range, an unknown name, an undecodable image)."""


class ModelNotFound(InvalidRequest):
    """A model or LoRA name that no manifest defines."""


class ManifestError(SDError):
    """A manifest under models/ that does not validate; raised at startup."""


class UnsafeCheckpoint(SDError):
    """A pickle-based checkpoint (.ckpt/.pt/.bin) while SD_ALLOW_PICKLE is off."""


class FetchError(SDError):
    """Weights could not be fetched from storage (missing object, bad credentials, store down)."""


class ChecksumMismatch(FetchError):
    """Fetched bytes do not match the sha256 the manifest pins."""


class OutOfMemory(SDError):
    """Generation ran out of (GPU or host) memory; caches were released and the worker can go on."""


class WorkerUnhealthy(SDError):
    """The worker cannot serve any more (unrecoverable CUDA error, corrupted pipeline): replace it."""


class Cancelled(SDError):
    """The caller cancelled the generation (between two denoising steps)."""


class UploadError(SDError):
    """Result images could not be uploaded to the output bucket (bad configuration, credentials, store down)."""
