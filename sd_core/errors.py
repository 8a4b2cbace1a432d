"""The exceptions sd_core raises: each one carries a message a user can act on, and the field it is about."""

from __future__ import annotations

import re

QUOTE_MAX_CHARS = 80
# A URL with credentials or a query string anywhere in a text: both are cut before the text is shown. No length caps
# inside (a longer user part or path would let its secrets through); still linear: the path's characters include the
# user part's, so a failed user-part scan is re-read once by the path and the search resumes after it.
_URL_SECRETS = re.compile(r"(?P<keep>[A-Za-z][A-Za-z0-9+.-]{0,20}://)(?:[^\s/@?#]*@)?(?P<path>[^\s?#]*)"
                          r"(?P<query>[?#]\S*)?")


def scrub(text: str) -> str:
    """``text`` with every URL's credentials and query string removed (``https://h/p?…``): safe for errors and logs."""
    return _URL_SECRETS.sub(lambda m: m["keep"] + m["path"] + ("?…" if m["query"] else ""), text)


def quote(value, limit: int = QUOTE_MAX_CHARS) -> str:
    """A user's value as an error message shows it: repr'd, URL secrets removed, at most ``limit`` characters + "…"."""
    text = scrub(value) if isinstance(value, str) else value
    shown = repr(text[:limit] if isinstance(text, str) else text)
    if isinstance(text, str) and len(text) > limit:
        return shown + "…"
    return shown if len(shown) <= limit + 2 else shown[:limit] + "…"


class SDError(Exception):
    """Base of every error sd_core raises on purpose. ``str()`` gives ``"<field>: <reason>"``; URL credentials and
    query strings in the message are removed (:func:`scrub`), whoever wrote it."""

    def __init__(self, message: str, *, field: str | None = None):
        message = scrub(message)
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
