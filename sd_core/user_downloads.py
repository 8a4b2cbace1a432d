"""Downloading user URLs under the policy of sd_core/user_urls.py: pinned addresses, re-checked redirects, limits.

:func:`open_user_url` connects to the very address that was checked (no second DNS lookup a rebinding server could
answer differently), follows redirects itself and checks every hop again, asks for an unencoded body (no
decompression bombs), and stops at the size limit (``SD_URL_MAX_BYTES`` and the caller's) and the time limit
(``SD_URL_TIMEOUT_S``). Environment proxies are not used for user URLs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import urllib3

from .errors import InvalidRequest
from .lora_links import credential_headers
from .settings import Settings
from .user_urls import WEB_SCHEMES, CheckedURL, check_user_url, redact_url

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # between two received chunks; the whole download has SD_URL_TIMEOUT_S
CHUNK = 1 << 16


def _refuse(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def _network_error(message: str):
    """Network failures are raised as requests.ConnectionError: the storage layer retries those (transient)."""
    import requests

    return requests.ConnectionError(message)


def _connect(checked: CheckedURL, field: str, headers: dict[str, str], read_timeout: float):
    """GET the checked URL from one of its checked addresses; returns an unread urllib3 response."""
    parts = urlsplit(checked.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"User-Agent": "sd-serverless", **headers, "Host": parts.netloc, "Accept-Encoding": "identity"}
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout)
    last_error = "no address"
    for address in checked.addresses:
        if checked.scheme == "https":
            import certifi

            pool = urllib3.HTTPSConnectionPool(
                address, checked.port, timeout=timeout, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(), server_hostname=checked.host, assert_hostname=checked.host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, checked.port, timeout=timeout, retries=False, maxsize=1)
        try:
            return pool.urlopen("GET", target, headers=headers, redirect=False, retries=False,
                                preload_content=False, decode_content=False, assert_same_host=False)
        except urllib3.exceptions.HTTPError as exc:
            pool.close()
            last_error = type(exc).__name__
    raise _network_error(f"download of {checked.redacted} failed ({last_error})")


class UserResponse:
    """A response to a user URL, shaped like a streamed ``requests.Response`` (status_code, headers,
    iter_content, context manager), whose body cannot pass the size or time limit."""

    def __init__(self, response, checked: CheckedURL, limit: int, deadline: float, timeout_s: float, field: str):
        self._response = response
        self.checked = checked
        self.url = checked.url
        self.status_code = response.status
        self.headers = response.headers
        self._limit, self._deadline, self._timeout_s, self._field = limit, deadline, timeout_s, field

    def iter_content(self, chunk_size: int = CHUNK):
        total = 0
        while True:
            if time.monotonic() > self._deadline:
                raise _refuse(f"download of {self.checked.redacted} took longer than {self._timeout_s:g} s "
                              "(SD_URL_TIMEOUT_S)", self._field)
            try:  # read1: whatever has arrived, so a server trickling bytes still meets the deadline check
                chunk = self._response.read1(chunk_size, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _network_error(f"download of {self.checked.redacted} failed ({type(exc).__name__})") from None
            if not chunk:
                return
            total += len(chunk)
            if total > self._limit:
                raise _refuse(f"download of {self.checked.redacted} is larger than the limit of {self._limit} "
                              "bytes (SD_URL_MAX_BYTES)", self._field)
            yield chunk

    def close(self) -> None:
        self._response.release_conn()
        self._response.close()

    def __enter__(self) -> UserResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_user_url(url: str, *, field: str, settings: Settings | None = None, headers: dict[str, str] | None = None,
                  max_bytes: int | None = None, schemes: tuple[str, ...] = WEB_SCHEMES) -> UserResponse:
    """GET a user http(s) URL under the policy; redirects are followed here and every hop is checked again.

    Returns the first non-redirect response, whatever its status. Raises InvalidRequest for policy refusals,
    declared bodies over the limit and redirect loops; ``requests.ConnectionError`` for network failures.
    """
    settings = settings or Settings()
    limit = min(max_bytes or settings.url_max_bytes, settings.url_max_bytes)
    deadline = time.monotonic() + settings.url_timeout_s
    checked = check_user_url(url, field=field, settings=settings, schemes=schemes)
    for _hop in range(MAX_REDIRECTS + 1):
        read_timeout = min(READ_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
        hop_headers = {**(headers or {}), **credential_headers(checked, settings)}  # per hop: never to a redirect
        response = _connect(checked, field, hop_headers, read_timeout)
        if response.status in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            response.release_conn()
            response.close()
            if not location:
                raise _refuse(f"download of {checked.redacted}: redirect without a Location", field)
            checked = check_user_url(urljoin(checked.url, location.strip()), field=field, settings=settings,
                                     schemes=schemes)
            continue
        declared = response.headers.get("Content-Length", "")
        whole = response.headers.get("Content-Range", "").rpartition("/")[2]
        for size in (declared, whole):
            if size.isdigit() and int(size) > limit:
                response.release_conn()
                response.close()
                raise _refuse(f"download of {checked.redacted} is {size} bytes, larger than the limit of {limit} "
                              "bytes (SD_URL_MAX_BYTES)", field)
        return UserResponse(response, checked, limit, deadline, settings.url_timeout_s, field)
    raise _refuse(f"download of {redact_url(url)}: more than {MAX_REDIRECTS} redirects", field)


def iter_user_url(
    url: str, *, field: str, max_bytes: int, settings: Settings | None = None, schemes: tuple[str, ...] = WEB_SCHEMES,
) -> Iterator[bytes]:
    """Stream a user http(s) URL's body under the policy (see :func:`open_user_url`); any failure is InvalidRequest."""
    import requests

    try:
        with open_user_url(url, field=field, settings=settings, max_bytes=max_bytes, schemes=schemes) as response:
            if response.status_code != 200:
                raise _refuse(f"download of {response.checked.redacted} failed: HTTP {response.status_code}", field)
            yield from response.iter_content(CHUNK)
    except requests.RequestException as exc:
        raise _refuse(str(exc), field) from None


def download_user_url(url: str, *, field: str, max_bytes: int, settings: Settings | None = None,
                      schemes: tuple[str, ...] = WEB_SCHEMES) -> bytes:
    """GET a user-supplied http(s) URL into memory under the policy, refusing bodies larger than the limits."""
    return b"".join(iter_user_url(url, field=field, max_bytes=max_bytes, settings=settings, schemes=schemes))
