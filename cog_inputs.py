"""Cog file inputs (image, mask, control_image) reach run() as text, so sd_core's URL policy fetches them, not Cog."""

# Why: predict.py declares image/mask as `cog.Path`, which gives them `{"type": "string", "format": "uri"}` in the
# OpenAPI schema (`cog build` reads the signature statically): Replicate's web form shows an upload widget for it and
# the replicate clients send file handles as https URLs or data URIs. But Cog itself would then fetch those URLs with
# plain `requests.get` before run() is called (any host: loopback, private networks, redirects — an open proxy).
# Checked on cog/coglet 0.23.1: for a data:/http(s) value of a Path input, `cog.types.Path.validate` is called
# (coglet's worker; `cog._adt.PrimitiveType.normalize` calls it for every value) and returns a `URLPath`; coglet's
# worker bridge downloads every `URLPath` input ("Downloading N URLPath input(s)") before run(). Other text reaches
# run() as a plain str (coglet) or a Path (`cog._inspector.check_input`).
# The hook: `Path.validate` is wrapped so that a data:/http(s) string comes back as `UserFileText` (a str, not a
# URLPath: coglet leaves it alone) and any other string is refused ("image: ..." as the error, without the value).
# run() passes the text on through `user_file_text` (which refuses anything else, Path objects included: no local
# file is ever read) to sd_core (sd_core/input_images.py -> sd_core/user_urls.py: scheme/host policy, pinned address,
# redirects re-checked, size and time limits). Path objects (the images run() returns) go through unchanged.
# tests/adapters/test_cog_inputs.py fails if a future cog stops calling Path.validate or downloads URLs anyway.

from __future__ import annotations

import json
import re
from typing import Any

import cog.types

from sd_core.errors import InvalidRequest, quote

CHECKED_COG_VERSION = "0.23.1"
_ACCEPTED = re.compile(r"^\s*(data:|https?://)", re.IGNORECASE)
REFUSED = "expected an image file (upload), a data: URI or an https:// URL; local paths and other schemes are refused"


class UserFileText(str):
    """A data: URI or http(s) URL given for a Cog file input, kept as text: Cog does not download it."""


_cog_validate = cog.types.Path.validate.__func__


def _validate(cls, value: Any) -> Any:
    """cog.types.Path.validate for inputs: data:/http(s) text stays text; other text is refused; paths unchanged."""
    if isinstance(value, str):
        if _ACCEPTED.match(value):
            return UserFileText(value)
        raise ValueError(REFUSED)  # cog reports it as "<field>: <message>", without the value
    return _cog_validate(cls, value)


def install() -> None:
    """Wrap cog.types.Path.validate (idempotent), then check that Cog's input normalization now goes through it."""
    if cog.types.Path.validate.__func__ is not _validate:
        cog.types.Path.validate = classmethod(_validate)
    from cog._adt import PrimitiveType

    if not isinstance(PrimitiveType.PATH.normalize("https://example.com/x.png"), UserFileText):
        # Fail closed: without the hook Cog would fetch any URL itself. Re-check this module against the new cog.
        raise RuntimeError(f"cog_inputs: the Path.validate hook (checked on cog {CHECKED_COG_VERSION}) has no effect")


def control_units(image: Any, model: str | None, scale: float, start: float, end: float,
                  preprocessor: str = "none") -> list[dict]:
    """The Cog ControlNet inputs as GenerationRequest's ``controlnets`` (none without a control image)."""
    if image is None and model is None:
        return []
    if image is None or model is None:
        missing = "control_image" if image is None else "control_model"
        raise InvalidRequest("control_image and control_model go together", field=missing)
    return [{"model": model, "image": user_file_text(image, "control_image"), "scale": scale, "start": start,
             "end": end, "preprocessor": preprocessor}]


def user_file_text(value: Any, field: str) -> str | None:
    """A Cog file input as the text GenerationRequest takes (data URI or URL); never a local file read."""
    if value is None:
        return None
    if isinstance(value, str) and _ACCEPTED.match(value):  # a Path (Cog download, local file) is never read
        return str(value)
    raise InvalidRequest(REFUSED, field=field)


def parse_embedding_list(text: str | None) -> list[dict[str, str]]:
    """Cog's one-string form of `embeddings`: ``"name=https://..., name2=s3://..."`` -> [{name, source}, ...]."""
    specs = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, source = part.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise InvalidRequest(f"expected name=URL pairs separated by commas; got {quote(part.strip())}",
                                 field="embeddings")
        specs.append({"name": name.strip(), "source": source.strip()})
    return specs


def parse_sigmas(text: str | None) -> list[float] | None:
    """Cog's one-string form of `sigmas`: ``"1, 0.75, 0.5, 0.25"`` -> [1.0, 0.75, 0.5, 0.25]; empty: None."""
    if text is None or not text.strip():
        return None
    sigmas = []
    for part in text.split(","):
        try:
            sigmas.append(float(part))
        except ValueError:
            raise InvalidRequest(f"expected numbers separated by commas; got {quote(part.strip(), 40)}",
                                 field="sigmas") from None
    return sigmas


def parse_control_units(text: str | None) -> list[dict]:
    """Cog's JSON form of more ControlNet units: ``'[{"model": ..., "image": ..., ...}]'`` -> GenerationRequest's
    ``controlnets`` items (validated there like a native request's); empty: none."""
    if text is None or not text.strip():
        return []
    try:
        units = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"not valid JSON ({quote(str(exc), 80)})", field="control_units") from None
    if not isinstance(units, list) or not all(isinstance(unit, dict) for unit in units):
        raise InvalidRequest("expected a JSON list of unit objects ([{\"model\": ..., \"image\": ...}])",
                             field="control_units")
    return units
