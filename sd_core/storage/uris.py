"""Weights URIs: parsing (s3://, http(s)://, hf://, file://, paths), cache-key normalisation and redaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import FetchError

SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Query parameters that sign a URL (S3/GCS presigned, CloudFront, Azure SAS): never logged, not part of cache keys.
SIGNING_PARAMS = {"signature", "expires", "awsaccesskeyid", "key-pair-id", "policy", "sig", "se", "st", "sp", "sv",
                  "sr", "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "token", "x-amz-security-token"}
SCHEMES = ("s3", "http", "https", "hf", "file")


@dataclass(frozen=True)
class Location:
    """A parsed weights URI. `host` is the bucket (s3), repo id (hf) or netloc (http); `path` the key / path."""

    scheme: str
    uri: str
    host: str = ""
    path: str = ""
    revision: str | None = None

    @property
    def is_prefix(self) -> bool:
        if self.scheme == "hf":
            return self.path == "" or self.path.endswith("/")
        if self.scheme == "file":
            return self.path.endswith("/") or Path(self.path).is_dir()
        if self.scheme == "s3":
            return self.path == "" or self.path.endswith("/")
        return self.path.endswith("/")

    @property
    def display(self) -> str:
        return redact(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path.rstrip("/")).name or "object"


def redact(uri: str) -> str:
    """The URI as it may appear in logs and errors: no user:password, no query string (presigned signatures)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_uri(uri: str) -> Location:
    """Split a weights URI. Raises FetchError for empty, malformed or unsupported ones."""
    if not isinstance(uri, str) or not uri.strip():
        raise FetchError("empty weights URI", field="uri")
    uri = uri.strip()
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Location("file", uri, "", str(Path(uri).expanduser()) + ("/" if uri.endswith("/") else ""))
    scheme = scheme.lower()
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise FetchError(f"no bucket in {uri!r}: expected s3://bucket/key", field="uri")
        return Location("s3", uri, bucket, key)
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        if not parts.hostname:
            raise FetchError(f"no host in {redact(uri)}", field="uri")
        return Location(scheme, uri, parts.netloc, parts.path or "/")
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file:// URI with a remote host: {uri!r}", field="uri")
        return Location("file", uri, "", unquote(parts.path))
    if scheme == "hf":
        segments = rest.split("/")
        if len(segments) < 2 or not segments[0] or not segments[1]:
            raise FetchError(f"expected hf://org/repo[@revision][/path], got {uri!r}", field="uri")
        repo, _, revision = segments[1].partition("@")
        return Location("hf", uri, f"{segments[0]}/{repo}", "/".join(segments[2:]), revision or None)
    raise FetchError(f"unsupported URI scheme {scheme!r} in {redact(uri)}: use s3://, https://, hf://, file:// or a "
                     "local path", field="uri")


def _is_signing_param(name: str) -> bool:
    return name.lower() in SIGNING_PARAMS or name.lower().startswith(("x-amz-", "x-goog-"))


def credential_params(uri: str) -> str:
    """The signing / token parameters of an http(s) URL (what :func:`stable_url` leaves out), sorted, as one string:
    "" when it has none. User downloads hash it into their cache key, so a file fetched with a credential is only
    served again to a request presenting the same one."""
    query = parse_qsl(urlsplit(uri).query, keep_blank_values=True)
    return urlencode(sorted((k, v) for k, v in query if _is_signing_param(k)))


def stable_url(uri: str) -> str:
    """An http(s) URL without its signing parameters: a presigned URL re-signed tomorrow is the same object."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_signing_param(k)]
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, urlencode(sorted(query)), ""))


def safe_relpath(rel: str, where: str) -> str:
    """A relative path from a listing, refused when it could escape the cache entry."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise FetchError(f"refusing unsafe object path {rel!r} under {where}")
    return str(p)


def check_sha256(value: str | None, field: str) -> str | None:
    """A pinned sha256 in lower case (None stays None); FetchError naming `field` when it is not a hex digest."""
    if value is None:
        return None
    if not SHA256_RE.match(value):
        raise FetchError(f"not a sha256 hex digest: {value!r}", field=field)
    return value.lower()
