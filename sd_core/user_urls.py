"""The policy for URLs and names that come from users (init images, LoRA links): what may be fetched, and how.

Every user-supplied URL goes through :func:`check_user_url` before anything is fetched:

- schemes: ``https`` and ``s3``; ``http`` only for hosts listed in ``SD_URL_ALLOWED_HOSTS``; never ``file://``,
  bare paths, credentials in the URL, or ambiguous numeric host spellings (``2130706433``, ``0177.0.0.1``);
- ``s3://``: read with the worker's own credentials, so only buckets / prefixes on ``SD_USER_S3_BUCKETS`` (default:
  the bucket of an ``s3://`` ``SD_WEIGHTS_URI``), checked before any request;
- addresses: the host name is resolved and EVERY address must be public: loopback, private, link-local (cloud
  metadata, 169.254.169.254 / fd00:ec2::254), shared, multicast, unspecified and reserved addresses are refused,
  including IPv4 addresses hidden inside IPv6 ones (IPv4-mapped, 6to4, Teredo, NAT64). Hosts listed in
  ``SD_URL_ALLOWED_HOSTS`` may be private (an internal model server, tests on 127.0.0.1); metadata endpoints never.

:mod:`sd_core.user_downloads` then fetches checked URLs (pinned address, redirects re-checked, size and time limits).
:func:`check_name` refuses path traversal in names that become file names (``..``, absolute paths, backslashes).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .errors import InvalidRequest, quote
from .settings import Settings

USER_SCHEMES = ("https", "s3")  # LoRA sources; wherever https is accepted, http is too for SD_URL_ALLOWED_HOSTS
WEB_SCHEMES = ("https",)  # init images and other downloads: web URLs only

# Instance metadata services hand out cloud credentials: refused even when an allow-list entry covers them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.169.253", "100.100.100.200")
)
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# Numeric host spellings that resolvers turn into an IPv4 address (decimal, octal, hex, short forms).
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +()\[\]-]{0,199}$")


@dataclass(frozen=True)
class CheckedURL:
    """A user URL that passed the policy: for http(s), the resolved addresses that may be connected to."""

    url: str
    scheme: str
    host: str
    port: int | None
    addresses: tuple[str, ...] = ()

    @property
    def redacted(self) -> str:
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """A URL as it may appear in messages and logs: no credentials, no query string (tokens, signatures)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    shown = f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path
    return shown[:200] + ("?…" if parts.query else "")


def _refuse(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (IPv4-mapped/-compatible, 6to4, Teredo, NAT64): each is checked too."""
    if address.version == 4:
        return []
    found = []
    if address.ipv4_mapped:
        found.append(address.ipv4_mapped)
    if address.sixtofour:
        found.append(address.sixtofour)
    if address.teredo:
        found.extend(address.teredo)
    if any(address in net for net in NAT64_PREFIXES):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if int(address) >> 32 == 0 and int(address) > 0xFFFF:  # deprecated IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_metadata_address(address) -> bool:
    return address in METADATA_ADDRESSES or any(a in METADATA_ADDRESSES for a in embedded_ipv4(address))


def address_problem(address) -> str | None:
    """Why ``address`` is not a public unicast address (None when it is)."""
    for candidate in (*embedded_ipv4(address), address):
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata endpoint"
        for attribute, label in (("is_unspecified", "an unspecified"), ("is_loopback", "a loopback"),
                                 ("is_link_local", "a link-local"), ("is_multicast", "a multicast"),
                                 ("is_private", "a private"), ("is_reserved", "a reserved")):
            if getattr(candidate, attribute):
                return f"{label} address"
        if getattr(candidate, "is_site_local", False):
            return "a site-local address"
        if not candidate.is_global:
            return "a non-public address"
    return None


def _canonical_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as an IP literal is (None for a name)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_allowed(host: str, settings: Settings) -> bool:
    """Whether the URL's host is on SD_URL_ALLOWED_HOSTS (a name, an address, or a network such as 10.0.0.0/8)."""
    literal = _ip_literal(host)
    for entry in settings.url_allowed_hosts:
        entry = entry.strip().lower()
        if literal is not None and "/" in entry:
            try:
                if literal in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif _canonical_host(entry) == host:
            return True
    return False


def user_s3_entries(settings: Settings) -> tuple[tuple[str, str], ...]:
    """(bucket, key prefix) pairs ``s3://`` user URLs may name: SD_USER_S3_BUCKETS, else the bucket of an s3://
    SD_WEIGHTS_URI, else none. ``none`` in the setting refuses them all."""
    entries = settings.user_s3_buckets
    if entries is None:
        weights = str(settings.weights_uri)
        entries = (weights.split("://", 1)[1].split("/", 1)[0],) if weights.lower().startswith("s3://") else ()
    allowed = []
    for entry in entries:
        bucket, _, prefix = entry.strip().partition("/")
        if bucket and bucket.lower() != "none":
            allowed.append((bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""))
    return tuple(allowed)


def _check_s3_allowed(url: str, key: str, field: str, settings: Settings) -> None:
    """The worker reads s3:// user URLs with its own credentials: only buckets (and prefixes) on the allow-list.
    The bucket and key are compared as the storage layer reads them (no case folding, no percent-decoding)."""
    raw_bucket, _, raw_key = url.split("://", 1)[1].partition("/")
    for bucket, prefix in user_s3_entries(settings):
        if raw_bucket == bucket and raw_key.startswith(prefix) and key.startswith(prefix):
            return
    raise _refuse(f"{quote(redact_url(url))}: s3:// user URLs are read with the worker's own credentials and this "
                  "bucket or prefix is not on the allow-list; operators list readable buckets in SD_USER_S3_BUCKETS "
                  "(`bucket` or `bucket/prefix/`)", field)


def resolve_host(host: str, port: int, field: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise _refuse(f"cannot resolve host {quote(host)}", field) from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _refuse(f"host {quote(host)} has no address", field)
    return addresses


def check_user_url(
    url: str, *, field: str, settings: Settings | None = None, schemes: tuple[str, ...] = USER_SCHEMES,
    resolve: bool = True,
) -> CheckedURL:
    """Apply the user-URL policy (see the module docstring); raise InvalidRequest naming ``field`` otherwise."""
    settings = settings or Settings()
    if not isinstance(url, str) or not url.strip():
        raise _refuse("empty URL", field)
    if len(url) > 4096:
        raise _refuse("URL longer than 4096 characters", field)
    if any(ch in url for ch in "\\\r\n\t\x00 ") or any(ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise _refuse("URL contains whitespace, control characters or backslashes", field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse(f"not a valid URL: {redact_url(url)}", field) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        raise _refuse("file:// URLs are not accepted in requests", field)
    if not scheme or "://" not in url:
        raise _refuse(f"expected a URL ({' or '.join(s + '://' for s in schemes)}), not a path or a bare name", field)
    if parts.username is not None or parts.password is not None:
        raise _refuse("URLs with credentials (user:password@) are not accepted", field)
    raw_host = parts.hostname or ""
    if not raw_host:
        raise _refuse(f"URL has no host: {redact_url(url)}", field)
    host = _canonical_host(raw_host)

    if scheme == "s3" and "s3" in schemes:
        if not _S3_BUCKET.match(raw_host.lower()):
            raise _refuse(f"not a valid S3 bucket name: {quote(raw_host)}", field)
        key = unquote(parts.path).lstrip("/")
        if not key or check_path_problem(key):
            raise _refuse(f"S3 key {quote(key)}: {check_path_problem(key) or 'empty'}", field)
        if key.endswith("/"):
            raise _refuse(f"{quote(url)} names a folder; give the URL of one file", field)
        _check_s3_allowed(url, key, field, settings)
        return CheckedURL(url=url, scheme="s3", host=raw_host.lower(), port=None)

    literal = _ip_literal(host)
    if host in METADATA_NAMES or (literal is not None and is_metadata_address(literal)):
        raise _refuse(f"host {quote(host)} is a cloud metadata endpoint", field)
    allowed = _host_allowed(host, settings)
    if scheme == "http" and "https" in schemes:  # plain http: only for explicitly configured hosts
        if not allowed:
            raise _refuse(f"http:// is only accepted for hosts in SD_URL_ALLOWED_HOSTS; use https:// "
                          f"({redact_url(url)})", field)
    elif scheme != "https" or scheme not in schemes:
        raise _refuse(f"URL scheme {quote(scheme)} is not accepted; use {' or '.join(s + '://' for s in schemes)}",
                      field)
    if _NUMERIC_HOST.match(raw_host.lower()):
        try:
            ipaddress.IPv4Address(raw_host)
        except ValueError:
            raise _refuse(f"ambiguous numeric host {quote(raw_host)}; write IPv4 addresses as a.b.c.d", field) from None
    port = port or (443 if scheme == "https" else 80)
    addresses: list = []
    if resolve:
        addresses = resolve_host(host, port, field)
        for address in addresses:
            if is_metadata_address(address):
                raise _refuse(f"host {quote(host)} resolves to a cloud metadata endpoint ({address})", field)
            if not allowed:
                problem = address_problem(address)
                if problem:
                    raise _refuse(f"host {quote(host)} resolves to {address}, {problem}; user URLs must point to "
                                  "public addresses (operators can list internal hosts in SD_URL_ALLOWED_HOSTS)", field)
    return CheckedURL(url=url, scheme=scheme, host=host, port=port, addresses=tuple(str(a) for a in addresses))


def check_path_problem(name: str) -> str | None:
    """Why ``name`` (a relative name that may become a path) is unsafe, or None."""
    if "\\" in name:
        return "backslashes are not allowed"
    if "\x00" in name or any(ord(ch) < 32 for ch in name):
        return "control characters are not allowed"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute paths are not allowed"
    if any(part in ("..", ".") for part in name.split("/")):
        return "'..' and '.' path segments are not allowed"
    if "//" in name:
        return "empty path segments are not allowed"
    return None


def check_name(name: str, *, field: str) -> str:
    """A user-supplied name (LoRA name, file name): refused if it could escape a folder or is not a plain name."""
    if not isinstance(name, str) or not name:
        raise _refuse("empty name", field)
    problem = check_path_problem(name)
    if problem:
        raise _refuse(f"name {quote(name)}: {problem}", field)
    if not _NAME.match(name):
        raise _refuse(f"name {quote(name)}: use letters, digits, '.', '_', '-' (at most 200 characters)", field)
    return name


def check_lora_source(source: str, *, field: str, settings: Settings | None = None) -> CheckedURL | str:
    """A LoRA ``source`` from a request: a manifest LoRA name (returned as is) or a URL that passes the policy.

    Call it before fetching anything for the LoRA (the storage layer fetches checked URLs with
    :func:`sd_core.user_downloads.open_user_url`).
    """
    if isinstance(source, str) and "://" not in source and not source.startswith(("/", "~", ".")):
        return check_name(source, field=field)
    return check_user_url(source, field=field, settings=settings)
