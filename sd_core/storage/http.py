"""The http(s):// source: presigned URLs and plain HTTPS downloads, ranged when the server allows."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import FetchError
from ..settings import Settings
from . import signed_get
from .cache import uri_key
from .objects import CHUNK, RemoteObject, Transient, backoff
from .uris import Location, stable_url


class HttpSource:
    """http(s):// objects (presigned URLs included), ranged when the server allows it. requests probes (and follows
    redirects); the bytes of a URL that answers directly go through signed_get.py, as S3's (spliced / one buffer)."""

    def __init__(self, loc: Location, settings: Settings, user_url: bool = False):
        self.loc = loc
        self.settings = settings
        self.user_url = user_url  # from a request: sd_core.user_urls's policy at every redirect, size/time limits
        self._local = threading.local()
        # requests adds nothing to the GETs of an operator's URL (a user's goes through the URL policy at every hop)
        # with no credentials in it, no proxy and no .netrc: its bytes go through signed_get.py (spliced, one buffer)
        # unless it answers through a redirect (RemoteObject.redirected)
        self.buffered = (not (user_url or urlsplit(loc.uri).username is not None or _netrc_present())
                         and signed_get.usable())
        self.ca_bundle = _ca_bundle() if self.buffered else None

    @property
    def session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "sd-serverless"
            self._local.session = session
        return session

    @property
    def timeout(self) -> tuple[float, float]:
        return (min(10.0, self.settings.fetch_timeout_s), self.settings.fetch_timeout_s)

    def object_key(self) -> str:
        if self.user_url:  # a request's URL: its credentials are part of the key (lora_links.credential_identity)
            from ..lora_links import credential_identity

            return uri_key("http-user", stable_url(self.loc.uri), credential_identity(self.loc.uri, self.settings))
        return uri_key("http", stable_url(self.loc.uri))

    def prefix_key(self, pins: dict[str, str]) -> str:  # pragma: no cover - http prefixes are refused earlier
        raise FetchError(f"cannot list {self.loc.display}: http(s) URLs name single files", field="uri")

    def _checked_status(self, response) -> int:
        """The response's status; raises the FetchError a final (non-transient) error status means."""
        error = self._status_error(response.status_code)
        if error is not None:
            raise error
        return response.status_code

    def _status_error(self, status: int) -> FetchError | None:
        where = self.loc.display
        if status in (404, 410):
            return FetchError(f"object not found: {where} (HTTP {status})", field="uri")
        if status in (401, 403):
            return FetchError(f"access denied to {where} (HTTP {status}); a presigned URL may have expired",
                              field="credentials")
        if status == 412:
            return FetchError(f"{where} changed on the server during the download (ETag differs); fetch again",
                              field="uri")
        if status >= 500 or status == 429:
            return None  # transient
        if status >= 400:
            return FetchError(f"HTTP {status} from {where}", field="uri")
        return None

    def _get(self, headers: dict):
        import requests

        try:
            if self.user_url:
                from ..user_downloads import open_user_url

                return open_user_url(self.loc.uri, field="uri", settings=self.settings, headers=headers)
            return self.session.get(self.loc.uri, headers={"Accept-Encoding": "identity", **headers}, stream=True,
                                    timeout=self.timeout, allow_redirects=True)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"cannot reach {urlsplit(self.loc.uri).netloc.rsplit('@', 1)[-1]}: "
                             f"{type(exc).__name__}") from None
        except requests.RequestException as exc:  # an OSError: uncaught, Transfer would call it a cache-write error
            raise FetchError(f"cannot fetch {self.loc.display}: {type(exc).__name__}", field="uri") from None

    def stat(self) -> RemoteObject:
        """Probe with a 1-byte ranged GET (a HEAD would fail on URLs presigned for GET)."""
        retries = self.settings.fetch_retries
        for attempt in range(retries + 1):
            try:
                with self._get({"Range": "bytes=0-0"}) as response:
                    status = self._checked_status(response)
                    etag = response.headers.get("ETag")
                    redirected = self.user_url or bool(response.history)  # (a user's URL: its own redirects)
                    if status == 206:
                        total = response.headers.get("Content-Range", "").rpartition("/")[2]
                        if total.isdigit():
                            return RemoteObject(self.loc.name, self.loc.uri, int(total), etag, redirected=redirected)
                        return RemoteObject(self.loc.name, self.loc.uri, None, etag, ranges=False,
                                            redirected=redirected)
                    if status == 416:
                        return RemoteObject(self.loc.name, self.loc.uri, 0, etag, redirected=redirected)
                    if status == 200:
                        length = response.headers.get("Content-Length")
                        size = int(length) if length and length.isdigit() else None
                        return RemoteObject(self.loc.name, self.loc.uri, size, etag, ranges=False,
                                            redirected=redirected)
                    raise Transient(f"HTTP {status}")
            except Transient as exc:
                if attempt == retries:
                    raise FetchError(f"cannot fetch {self.loc.display} after {retries + 1} attempts: {exc}",
                                     field="uri") from None
                time.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    def list(self) -> list[RemoteObject]:
        raise FetchError(f"cannot list {self.loc.display}: http(s) URLs name single files, not folders", field="uri")

    def read_range(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
        import requests

        ranged = end is not None and obj.ranges
        strong_etag = obj.etag if obj.etag and not obj.etag.startswith("W/") else None
        if self.buffered and not obj.redirected:
            try:
                return signed_get.read_signed(self.loc.uri, start, end if ranged else None,
                                              strong_etag if ranged else None, sink, self.settings.fetch_timeout_s,
                                              ca_bundle=self.ca_bundle)
            except signed_get.Final as exc:
                if not 300 <= exc.status < 400:  # (a redirect now: requests follows it below)
                    raise self._status_error(exc.status) or FetchError(
                        f"{self.loc.display} answered {exc} to a GET it had answered before", field="uri") from None
        headers = {}
        if ranged:
            headers["Range"] = f"bytes={start}-{end}"
            if strong_etag:
                headers["If-Match"] = strong_etag
        response = self._get(headers)
        with response:
            status = self._checked_status(response)
            if status >= 500 or status == 429:
                raise Transient(f"HTTP {status}")
            if headers.get("Range") and status != 206:
                raise FetchError(f"{self.loc.display} ignored a Range request (HTTP {status})", field="uri")
            try:
                for chunk in response.iter_content(CHUNK):
                    sink(chunk)
            except requests.RequestException as exc:
                raise Transient(f"{type(exc).__name__} while streaming") from None


def _netrc_present() -> bool:
    """requests would send credentials from a .netrc file (NETRC, or ~/.netrc): leave those fetches to it."""
    return Path(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).is_file()  # (no home: "~/.netrc")


def _ca_bundle() -> str | None:
    """The CA file requests would use (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's); added to the system's."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import certifi
    except ImportError:  # pragma: no cover - requests depends on certifi
        return None
    return certifi.where()
