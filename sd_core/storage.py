"""Fetching weights into the local cache: s3://, http(s)://, hf://, file:// and paths (parallel, verified, resumable).

``fetch(uri, settings, sha256=..., files=...)`` is the one entry point. Remote objects are downloaded with parallel
ranged GETs (one shared boto3 client / per-thread HTTP sessions, ``SD_FETCH_CONCURRENCY`` connections,
``SD_FETCH_PART_MB`` per request) straight into a pre-allocated file: nothing is buffered whole in memory. Each part is
retried with backoff; completed parts are recorded in a sidecar file so that a download interrupted by a crash or a
restart resumes where it stopped; every part request carries ``If-Match: <etag>`` so a resumed or parallel download
never mixes two versions of an object. A pinned sha256 is computed while the parts arrive (in order, from the page
cache) and checked at the end: a mismatch deletes the bytes and fetches once more, then raises ChecksumMismatch.
Cache layout, keys, locking and eviction: see sd_core/cache.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .cache import GB, Entry, WeightsCache, content_key, uri_key, write_json_atomic
from .errors import ChecksumMismatch, FetchError
from .progress import Progress
from .settings import Settings

log = logging.getLogger("sd_core.fetch")

CHUNK = 1 << 20  # bytes per socket read / pwrite
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Query parameters that sign a URL (S3/GCS presigned, CloudFront, Azure SAS): never logged, not part of cache keys.
SIGNING_PARAMS = {"signature", "expires", "awsaccesskeyid", "key-pair-id", "policy", "sig", "se", "st", "sp", "sv",
                  "sr", "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "token", "x-amz-security-token"}
SCHEMES = ("s3", "http", "https", "hf", "file")


# --------------------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------------------
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


def _stable_url(uri: str) -> str:
    """An http(s) URL without its signing parameters: a presigned URL re-signed tomorrow is the same object."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in SIGNING_PARAMS and not k.lower().startswith(("x-amz-", "x-goog-"))]
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, urlencode(sorted(query)), ""))


def _safe_relpath(rel: str, where: str) -> str:
    """A relative path from a listing, refused when it could escape the cache entry."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise FetchError(f"refusing unsafe object path {rel!r} under {where}")
    return str(p)


def _check_sha256(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if not SHA256_RE.match(value):
        raise FetchError(f"not a sha256 hex digest: {value!r}", field=field)
    return value.lower()


# --------------------------------------------------------------------------------------------------------------
# Sources: where bytes come from
# --------------------------------------------------------------------------------------------------------------
class _Transient(Exception):
    """A failure worth retrying (connection reset, timeout, short read, 5xx)."""


class _Stopped(Exception):
    """The transfer is being aborted (another part failed for good)."""


# A write into the cache that failed because the disk (or the process's file size limit, or a quota) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


@dataclass
class RemoteObject:
    """One object to download: `rel` is its path inside the cache entry."""

    rel: str
    ref: str  # the source's own name for it (S3 key, URL)
    size: int | None
    etag: str | None
    sha256: str | None = None
    ranges: bool = True  # the server answers ranged GETs

    def matches(self, meta: dict) -> bool:
        return meta.get("size") == self.size and (meta.get("etag") or None) == (self.etag or None)


def _backoff(attempt: int) -> float:
    return min(0.25 * 2**attempt, 10.0) * random.uniform(0.5, 1.5)


def s3_client(settings: Settings, *, concurrency: int | None = None):
    """A boto3 S3 client for weights: boto3's credential/region chain, SD_S3_ENDPOINT_URL, bounded timeouts/retries.

    One client serves all threads of a fetch (boto3 clients are thread-safe); its pool holds a connection per part.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    connections = concurrency or settings.fetch_concurrency
    config = Config(
        connect_timeout=min(10.0, settings.fetch_timeout_s),
        read_timeout=settings.fetch_timeout_s,
        retries={"mode": "standard", "max_attempts": settings.fetch_retries + 1},
        max_pool_connections=max(10, connections + 2),
        # Ranged GETs carry no full-object checksum (we verify sha256 ourselves); "when_required" also keeps
        # uploads compatible with stores that reject the newer default checksum trailers (older MinIO, B2).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="sd-serverless",
    )
    # A fresh session per call sees current credentials; the shared loader spares re-parsing the S3 model (~0.1 s).
    core = botocore.session.Session()
    core.register_component("data_loader", _botocore_loader())
    session = boto3.session.Session(botocore_session=core)
    return session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)


@functools.cache
def _botocore_loader():
    import botocore.loaders

    return botocore.loaders.create_loader()


class _S3Source:
    """s3:// objects through boto3 (any S3-compatible endpoint). Credentials come from boto3's standard chain."""

    def __init__(self, loc: Location, settings: Settings):
        self.loc = loc
        self.settings = settings
        self.bucket = loc.host

    @cached_property
    def client(self):
        return s3_client(self.settings)

    @property
    def endpoint(self) -> str:
        try:
            return redact(self.client.meta.endpoint_url)
        except Exception:
            return self.settings.s3_endpoint_url or "the default S3 endpoint"

    def object_key(self) -> str:
        return uri_key("s3", self.settings.s3_endpoint_url or "", self.bucket, self.loc.path)

    def prefix_key(self, pins: dict[str, str]) -> str:
        return uri_key("s3-prefix", self.settings.s3_endpoint_url or "", self.bucket, self.loc.path,
                       json.dumps(pins, sort_keys=True))

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- errors ---
    def _explain(self, exc: Exception, key: str, *, probe: bool = True) -> FetchError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            CredentialRetrievalError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        uri = self._uri(key)
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if probe and code in ("400", "403", "404", "Forbidden", "NotFound", "Not Found", "BadRequest"):
                # HEAD answers carry no error body: one tiny GET tells a wrong secret from a missing permission.
                try:
                    self.client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
                except Exception as detail:
                    if isinstance(detail, ClientError):
                        return self._explain(detail, key, probe=False)
            if code in ("NoSuchKey", "404", "NotFound", "Not Found"):
                return FetchError(f"object not found: {uri} (at {self.endpoint})", field="uri")
            if code == "NoSuchBucket":
                return FetchError(f"bucket {self.bucket!r} does not exist at {self.endpoint} (fetching {uri})",
                                  field="uri")
            if code == "InvalidAccessKeyId":
                return FetchError(f"S3 credentials rejected by {self.endpoint} while fetching {uri}: the access key "
                                  "id is unknown (check AWS_ACCESS_KEY_ID / AWS_PROFILE)", field="credentials")
            if code == "SignatureDoesNotMatch":
                return FetchError(f"S3 credentials rejected by {self.endpoint} while fetching {uri}: the secret key "
                                  "does not match the access key id (check AWS_SECRET_ACCESS_KEY)",
                                  field="credentials")
            if code in ("ExpiredToken", "TokenRefreshRequired", "InvalidToken"):
                return FetchError(f"S3 credentials for {self.endpoint} have expired or are invalid ({code}) while "
                                  f"fetching {uri} (check AWS_SESSION_TOKEN / your credential source)",
                                  field="credentials")
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
                return FetchError(f"access denied to {uri} at {self.endpoint}: the credentials lack read permission "
                                  "(s3:GetObject, s3:ListBucket) or are wrong", field="credentials")
            if code in ("PreconditionFailed", "412"):
                return FetchError(f"{uri} changed in the store during the download (ETag differs); fetch again",
                                  field="uri")
            return FetchError(f"S3 error {code or '?'} (HTTP {status}) while fetching {uri} from {self.endpoint}",
                              field="uri")
        if isinstance(exc, NoCredentialsError):
            return FetchError(f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or AWS_PROFILE / an instance role)", field="credentials")
        if isinstance(exc, (PartialCredentialsError, CredentialRetrievalError)):
            return FetchError(f"incomplete S3 credentials for {uri}: {exc}", field="credentials")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
            return FetchError(f"cannot reach the S3 endpoint {self.endpoint} for {uri} after "
                              f"{self.settings.fetch_retries + 1} attempts ({type(exc).__name__}); check "
                              "SD_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network", field="uri")
        return FetchError(f"S3 client error while fetching {uri}: {type(exc).__name__}: {exc}", field="uri")

    # --- operations ---
    def stat(self) -> RemoteObject:
        key = self.loc.path
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            error = self._explain(exc, key)
            if error.message.startswith("object not found"):
                with contextlib.suppress(Exception):
                    listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key + "/", MaxKeys=1)
                    if listed.get("KeyCount"):
                        error = FetchError(f"{error.message}; it is a folder: end the URI with '/' to fetch "
                                           "everything under it", field="uri")
            raise error from None
        return RemoteObject(self.loc.name, key, int(head["ContentLength"]), head.get("ETag"))

    def list(self) -> list[RemoteObject]:
        prefix = self.loc.path
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/"):
                        continue  # a "folder" marker object
                    rel = _safe_relpath(key[len(prefix):], self.loc.display)
                    found.append(RemoteObject(rel, key, int(item["Size"]), item.get("ETag")))
        except FetchError:
            raise
        except Exception as exc:
            raise self._explain(exc, prefix, probe=False) from None
        return found

    def read_range(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError as Urllib3Error

        kwargs = {"Bucket": self.bucket, "Key": obj.ref}
        if end is not None:
            kwargs["Range"] = f"bytes={start}-{end}"
        if obj.etag:
            kwargs["IfMatch"] = obj.etag
        try:
            response = self.client.get_object(**kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or status == 429:
                raise _Transient(f"HTTP {status}") from None
            raise self._explain(exc, obj.ref, probe=False) from None
        except Exception as exc:  # connection errors: botocore already retried them
            raise self._explain(exc, obj.ref) from None
        body = response["Body"]
        expected = (end - start + 1) if end is not None else obj.size
        if expected is not None and int(response.get("ContentLength", -1)) != expected:
            body.close()
            raise _Transient(f"Content-Length {response.get('ContentLength')} instead of {expected}")
        try:
            for chunk in body.iter_chunks(CHUNK):
                sink(chunk)
        except (BotoCoreError, Urllib3Error, ConnectionError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__} while streaming") from None
        finally:
            body.close()


class _HttpSource:
    """http(s):// objects (presigned URLs included) through requests, ranged when the server allows it."""

    def __init__(self, loc: Location, settings: Settings, user_url: bool = False):
        self.loc = loc
        self.settings = settings
        self.user_url = user_url  # from a request: sd_core.user_urls's policy at every redirect, size/time limits
        self._local = threading.local()

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
        return uri_key("http", _stable_url(self.loc.uri))

    def prefix_key(self, pins: dict[str, str]) -> str:  # pragma: no cover - http prefixes are refused earlier
        raise FetchError(f"cannot list {self.loc.display}: http(s) URLs name single files", field="uri")

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
                from .user_urls import open_user_url

                return open_user_url(self.loc.uri, field="uri", settings=self.settings, headers=headers)
            return self.session.get(self.loc.uri, headers={"Accept-Encoding": "identity", **headers}, stream=True,
                                    timeout=self.timeout, allow_redirects=True)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"cannot reach {urlsplit(self.loc.uri).netloc.rsplit('@', 1)[-1]}: "
                             f"{type(exc).__name__}") from None

    def stat(self) -> RemoteObject:
        """Probe with a 1-byte ranged GET (a HEAD would fail on URLs presigned for GET)."""
        retries = self.settings.fetch_retries
        for attempt in range(retries + 1):
            try:
                with self._get({"Range": "bytes=0-0"}) as response:
                    status = response.status_code
                    error = self._status_error(status)
                    if error is not None:
                        raise error
                    etag = response.headers.get("ETag")
                    if status == 206:
                        total = response.headers.get("Content-Range", "").rpartition("/")[2]
                        if total.isdigit():
                            return RemoteObject(self.loc.name, self.loc.uri, int(total), etag)
                        return RemoteObject(self.loc.name, self.loc.uri, None, etag, ranges=False)
                    if status == 416:
                        return RemoteObject(self.loc.name, self.loc.uri, 0, etag)
                    if status == 200:
                        length = response.headers.get("Content-Length")
                        size = int(length) if length and length.isdigit() else None
                        return RemoteObject(self.loc.name, self.loc.uri, size, etag, ranges=False)
                    raise _Transient(f"HTTP {status}")
            except _Transient as exc:
                if attempt == retries:
                    raise FetchError(f"cannot fetch {self.loc.display} after {retries + 1} attempts: {exc}",
                                     field="uri") from None
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def list(self) -> list[RemoteObject]:
        raise FetchError(f"cannot list {self.loc.display}: http(s) URLs name single files, not folders", field="uri")

    def read_range(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
        import requests

        headers = {}
        if end is not None and obj.ranges:
            headers["Range"] = f"bytes={start}-{end}"
            if obj.etag and not obj.etag.startswith("W/"):
                headers["If-Match"] = obj.etag
        response = self._get(headers)
        with response:
            status = response.status_code
            error = self._status_error(status)
            if error is not None:
                raise error
            if status >= 500 or status == 429:
                raise _Transient(f"HTTP {status}")
            if headers.get("Range") and status != 206:
                raise FetchError(f"{self.loc.display} ignored a Range request (HTTP {status})", field="uri")
            try:
                for chunk in response.iter_content(CHUNK):
                    sink(chunk)
            except requests.RequestException as exc:
                raise _Transient(f"{type(exc).__name__} while streaming") from None


# --------------------------------------------------------------------------------------------------------------
# The transfer: parallel ranged GETs into pre-allocated files, resumable, verified
# --------------------------------------------------------------------------------------------------------------
class _FileJob:
    """One object being downloaded into `staging/partial/<h>` and then renamed to `staging/data/<rel>`."""

    def __init__(self, obj: RemoteObject, staging: Path, part_size: int):
        self.obj = obj
        tag = hashlib.sha1(obj.rel.encode()).hexdigest()[:16]
        self.final = staging / "data" / obj.rel
        self.partial = staging / "partial" / tag
        self.sidecar = staging / "partial" / f"{tag}.json"
        self.ranged = bool(obj.ranges and obj.size)
        self.part_size = part_size if self.ranged else 0
        if obj.size == 0:
            self.nparts = 0
        elif self.ranged:
            self.nparts = math.ceil(obj.size / part_size)
        else:
            self.nparts = 1  # one streaming GET of the whole object (no ranges, or unknown size)
        self.done: set[int] = set()
        self.fd: int | None = None
        self.hasher = hashlib.sha256() if obj.sha256 else None
        self.hashed = 0
        self.refetched = False
        self.finished = False
        self.streamed = 0
        self.filled: dict[int, int] = {}  # part -> bytes written from its start in the current attempt
        self.hash_pos = 0  # bytes [0, hash_pos) are in the hasher
        self._hash_buf: memoryview | None = None
        self._saved: frozenset[int] = frozenset()
        self._saved_at = 0.0

    def part_range(self, i: int) -> tuple[int, int | None]:
        if not self.ranged:
            return 0, None
        start = i * self.part_size
        return start, min(self.obj.size, start + self.part_size) - 1

    def part_len(self, i: int) -> int:
        start, end = self.part_range(i)
        return (end - start + 1) if end is not None else 0

    @property
    def present_bytes(self) -> int:
        return sum(self.part_len(i) for i in self.done)

    def open(self, resume: bool) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        state = None
        if resume and self.ranged:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(self.sidecar.read_text())
        if (state and state.get("size") == self.obj.size and state.get("etag") == self.obj.etag
                and state.get("part_size") == self.part_size and self.partial.exists()
                and self.partial.stat().st_size == self.obj.size):
            self.done = {int(i) for i in state.get("done", []) if 0 <= int(i) < self.nparts}
            self._saved = frozenset(self.done)
        else:
            self.done = set()
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.partial.unlink()
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        if self.ranged and os.fstat(self.fd).st_size != self.obj.size:
            try:
                os.posix_fallocate(self.fd, 0, self.obj.size)  # reserve the space now: a full disk fails early
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise
                os.ftruncate(self.fd, self.obj.size)  # no fallocate on this filesystem: a sparse file

    def write(self, data, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)  # OSError: the transfer reports it (and cleans up a full disk)
            view = view[n:]
            offset += n

    def advance_hash(self) -> None:
        """Hash the bytes in order as far as they have arrived: whole parts, then the growing head of the first
        incomplete one (parts are written front to back), so little is left to hash when the last part lands."""
        if self.hasher is None:
            return
        while self.hashed < self.nparts:
            start, end = self.part_range(self.hashed)
            complete = self.hashed in self.done
            if complete:
                limit = end + 1 if end is not None else self.streamed
            elif self.ranged:
                limit = start + self.filled.get(self.hashed, 0)
            else:
                return
            self._hash_to(limit)
            if not complete:
                return
            self.hashed += 1

    def _hash_to(self, limit: int) -> None:
        if self._hash_buf is None:
            self._hash_buf = memoryview(bytearray(CHUNK * 8))
        view = self._hash_buf
        pos = self.hash_pos
        while pos < limit:
            n = os.preadv(self.fd, [view[: min(len(view), limit - pos)]], pos)
            if n <= 0:
                raise FetchError(f"{self.obj.rel}: the downloaded file is shorter than expected while verifying",
                                 field="uri")
            self.hasher.update(view[:n])
            pos += n
        self.hash_pos = max(self.hash_pos, pos)

    def checkpoint(self, fsync: bool, force: bool = False) -> None:
        """Record completed parts in the sidecar (at most every 0.25 s), so a restart resumes after them."""
        if not self.ranged or self.fd is None or self.finished:
            return
        done = frozenset(self.done)
        now = time.monotonic()
        if done == self._saved or (not force and now - self._saved_at < 0.25):
            return
        if fsync:
            os.fdatasync(self.fd)
        write_json_atomic(self.sidecar, {"size": self.obj.size, "etag": self.obj.etag, "part_size": self.part_size,
                                         "done": sorted(done)})
        self._saved, self._saved_at = done, now

    def discard(self) -> None:
        """Close and delete the partial file and its parts record."""
        self.close()
        for p in (self.partial, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def reset(self) -> None:
        """Throw the bytes away and start this object again from zero."""
        self.discard()
        self.done, self._saved = set(), frozenset()
        self.hasher = hashlib.sha256() if self.obj.sha256 else None
        self.hashed = 0
        self.hash_pos = 0
        self.filled = {}
        self.streamed = 0
        self.open(resume=False)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Transfer:
    """Downloads objects from one source into one staging folder with a shared pool of connections."""

    def __init__(self, source, staging: Path, settings: Settings, label: str):
        self.source = source
        self.staging = staging
        self.settings = settings
        self.label = label
        self.part_size = max(64 * 1024, int(settings.fetch_part_mb * 1024 * 1024))
        self.stop = threading.Event()
        self.progress: Progress | None = None
        self.journal_path = staging / "journal.json"

    def _load_journal(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.journal_path.read_text())
        return {}

    def run(self, objects: list[RemoteObject]) -> dict[str, dict]:
        """Fetch every object to staging/data/<rel>. Returns {rel: {size, etag, sha256}} for meta.json."""
        self.staging.mkdir(parents=True, exist_ok=True)
        journal = self._load_journal()
        jobs: list[_FileJob] = []
        for obj in objects:
            job = _FileJob(obj, self.staging, self.part_size)
            done = journal.get(obj.rel)
            if (done and obj.matches(done) and (done.get("sha256") or None) == (obj.sha256 or done.get("sha256"))
                    and job.final.exists() and job.final.stat().st_size == obj.size):
                job.finished = True
            jobs.append(job)
        todo = [j for j in jobs if not j.finished]
        for job in todo:
            try:
                job.open(resume=True)
            except OSError as exc:
                for other in todo:
                    other.close()
                raise self._write_error(job, exc, todo) from None
            except BaseException:
                for other in todo:
                    other.close()
                raise
        already = sum(j.obj.size or 0 for j in jobs if j.finished) + sum(j.present_bytes for j in todo)
        total = sum(j.obj.size or 0 for j in jobs) if all(j.obj.size is not None for j in jobs) else None
        if already and todo:
            log.info("resuming %s: %.1f MB already downloaded", self.label, already / 1e6)
        self.progress = Progress(self.label, total, self.settings.fetch_progress_s, already=already)
        parallel = max(1, min(self.settings.fetch_concurrency, sum(j.nparts - len(j.done) for j in todo) or 1))
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sd-fetch")
        pending: dict[Future, tuple[_FileJob, int]] = {}

        def submit(job: _FileJob) -> None:
            for i in range(job.nparts):
                if i not in job.done:
                    pending[pool.submit(self._fetch_part, job, i)] = (job, i)

        ok = False
        failed: tuple[_FileJob, OSError] | None = None  # a write into the cache that failed (a full disk...)
        self.progress.start()
        try:
            for job in todo:
                submit(job)
            while True:
                active = [j for j in jobs if not j.finished]
                if not active:
                    break
                finished_futures = ()
                if pending:
                    finished_futures, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
                for future in finished_futures:
                    job, i = pending.pop(future)
                    exc = future.exception()
                    if isinstance(exc, OSError):
                        failed = (job, exc)
                        break
                    if exc is not None and not isinstance(exc, _Stopped):
                        raise exc
                    job.done.add(i)
                if failed is not None:
                    break
                for job in active:
                    job.advance_hash()
                    job.checkpoint(self.settings.fetch_fsync)
                    if len(job.done) == job.nparts and (job.hasher is None or job.hashed == job.nparts):
                        try:
                            if self._finish(job, journal):
                                continue
                        except OSError as exc:
                            failed = (job, exc)
                            break
                        submit(job)  # checksum mismatch: one more try from zero
                if failed is not None:
                    break
            ok = failed is None
        finally:
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future, (job, i) in pending.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    job.done.add(i)
            unfinished = [job for job in jobs if not job.finished]
            for job in unfinished:
                if failed is None or failed[1].errno not in DISK_FULL:
                    with contextlib.suppress(Exception):
                        job.checkpoint(self.settings.fetch_fsync, force=True)
                job.close()
            self.progress.finish(ok=ok)
        if failed is not None:
            raise self._write_error(failed[0], failed[1], unfinished)
        return {j.obj.rel: {"size": j.obj.size if j.obj.size is not None else j.final.stat().st_size,
                            "etag": j.obj.etag, "sha256": j.obj.sha256} for j in jobs}

    def _write_error(self, job: _FileJob, exc: OSError, unfinished: list[_FileJob]) -> FetchError:
        """The error for a failed write into the cache: it names the object, never a local path. A full disk also
        deletes the unfinished partial files and their parts records at once (resuming them later is pointless)."""
        if exc.errno not in DISK_FULL:
            return FetchError(f"cannot write {self._where(job)} into the weights cache ({exc.strerror}); check "
                              "SD_CACHE_DIR", field="SD_CACHE_DIR")
        for other in unfinished:
            with contextlib.suppress(OSError):
                other.discard()
        size = f" ({job.obj.size} bytes)" if job.obj.size is not None else ""
        return FetchError(f"not enough disk space in the weights cache for {self._where(job)}{size}: "
                          f"{exc.strerror}; the partial download was deleted (free space, lower SD_CACHE_MAX_GB or "
                          "point SD_CACHE_DIR at a larger disk)", field="SD_CACHE_DIR")

    def _fetch_part(self, job: _FileJob, i: int) -> None:
        start, end = job.part_range(i)
        retries = self.settings.fetch_retries
        for attempt in range(retries + 1):
            if self.stop.is_set():
                raise _Stopped()
            written = 0

            def sink(chunk) -> None:
                nonlocal written
                if self.stop.is_set():
                    raise _Stopped()
                job.write(chunk, start + written)
                written += len(chunk)
                job.filled[i] = written
                self.progress.add(len(chunk))

            try:
                if not job.ranged:
                    os.ftruncate(job.fd, 0)
                self.source.read_range(job.obj, start, end, sink)
                expected = (end - start + 1) if end is not None else job.obj.size
                if expected is not None and written != expected:
                    raise _Transient(f"got {written} of {expected} bytes")
                if not job.ranged:
                    job.streamed = written
                return
            except _Transient as exc:
                self.progress.add(-written)
                job.filled[i] = 0
                where = f"part {i + 1}/{job.nparts} of {self.label}" if job.nparts > 1 else self.label
                if attempt == retries:
                    raise FetchError(f"fetching {where} failed after {retries + 1} attempts: {exc}",
                                     field="uri") from None
                delay = _backoff(attempt)
                log.warning("%s: %s; retry %d/%d in %.1fs", where, exc, attempt + 1, retries, delay)
                if self.stop.wait(delay):
                    raise _Stopped() from None

    def _finish(self, job: _FileJob, journal: dict) -> bool:
        """Verify and publish one object inside the staging folder. False = refetch it (first checksum mismatch)."""
        obj = job.obj
        size = os.fstat(job.fd).st_size
        if obj.size is not None and size != obj.size:
            raise FetchError(f"{self._where(job)}: got {size} bytes, the store announced {obj.size}", field="uri")
        if job.hasher is not None:
            digest = job.hasher.hexdigest()
            if digest != obj.sha256:
                if not job.refetched:
                    log.warning("sha256 mismatch for %s (expected %s, got %s): deleting it and fetching once more",
                                self._where(job), obj.sha256, digest)
                    job.refetched = True
                    job.reset()
                    if self.progress is not None:
                        self.progress.add(-size)
                    return False
                job.close()
                for p in (job.partial, job.sidecar):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                raise ChecksumMismatch(f"sha256 mismatch for {self._where(job)}: expected {obj.sha256}, got "
                                       f"{digest} (fetched twice); the stored object does not match the manifest",
                                       field="sha256")
        if self.settings.fetch_fsync:
            os.fsync(job.fd)
        job.close()
        job.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(job.partial, job.final)
        with contextlib.suppress(FileNotFoundError):
            job.sidecar.unlink()
        job.finished = True
        journal[obj.rel] = {"size": size, "etag": obj.etag, "sha256": obj.sha256}
        write_json_atomic(self.journal_path, journal)
        return True

    def _where(self, job: _FileJob) -> str:
        name = PurePosixPath(urlsplit(self.label).path.rstrip("/")).name  # (the label has no secrets to lose)
        return self.label if job.obj.rel == name else f"{self.label.rstrip('/')}/{job.obj.rel}"


# --------------------------------------------------------------------------------------------------------------
# Local files and the hub
# --------------------------------------------------------------------------------------------------------------
_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_SHA_MEMO_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a local file; remembered per (path, size, mtime) within the process."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_MEMO_LOCK:
        if memo_key in _SHA_MEMO:
            return _SHA_MEMO[memo_key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _SHA_MEMO_LOCK:
        _SHA_MEMO[memo_key] = digest
    return digest


def _verify_local(path: Path, display: str, sha256: str | None, size: int | None,
                  files: dict[str, str] | None) -> Path:
    if not path.exists():
        raise FetchError(f"not found: {display}", field="uri")
    if path.is_file():
        if size is not None and path.stat().st_size != size:
            raise ChecksumMismatch(f"size mismatch for {display}: {path.stat().st_size} bytes, the manifest says "
                                   f"{size}", field="size")
        if sha256 and (digest := file_sha256(path)) != sha256:
            raise ChecksumMismatch(f"sha256 mismatch for {display}: expected {sha256}, got {digest}", field="sha256")
    elif sha256:
        raise FetchError(f"{display} is a folder: pin its files' checksums with `files`, not `sha256`",
                         field="sha256")
    for rel, expected in (files or {}).items():
        member = path / _safe_relpath(rel, display)
        if not member.is_file():
            raise FetchError(f"pinned file {rel!r} is missing under {display}", field="files")
        if (digest := file_sha256(member)) != expected:
            raise ChecksumMismatch(f"sha256 mismatch for {display.rstrip('/')}/{rel}: expected {expected}, got "
                                   f"{digest}", field="files")
    return path


def _fetch_hf(loc: Location, settings: Settings, sha256: str | None, size: int | None,
              files: dict[str, str] | None) -> Path:
    """hf://org/repo[@rev][/path] through huggingface_hub into its own cache under SD_CACHE_DIR/hf (token: HF_TOKEN)."""
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime requirement
        raise FetchError(f"huggingface_hub is not installed: cannot fetch {loc.display}", field="uri") from None
    cache_dir = Path(settings.cache_dir) / "hf"
    t0 = time.monotonic()
    try:
        if loc.is_prefix:
            sub = loc.path.rstrip("/")
            root = snapshot_download(repo_id=loc.host, revision=loc.revision, cache_dir=cache_dir,
                                     allow_patterns=[f"{sub}/*"] if sub else None,
                                     max_workers=settings.fetch_concurrency)
            path = Path(root) / sub if sub else Path(root)
        else:
            path = Path(hf_hub_download(repo_id=loc.host, filename=loc.path, revision=loc.revision,
                                        cache_dir=cache_dir))
    except hf_errors.GatedRepoError:
        raise FetchError(f"{loc.display}: gated repository; accept its terms and set HF_TOKEN", field="uri") from None
    except hf_errors.RepositoryNotFoundError:
        raise FetchError(f"repository not found or not accessible: {loc.display} (set HF_TOKEN for private repos)",
                         field="uri") from None
    except hf_errors.RevisionNotFoundError:
        raise FetchError(f"revision not found: {loc.display}", field="uri") from None
    except hf_errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
        raise FetchError(f"cannot fetch {loc.display}: the hub is unreachable (or HF_HUB_OFFLINE is set) and it is "
                         "not in the local hub cache", field="uri") from None
    except hf_errors.EntryNotFoundError:
        raise FetchError(f"object not found: {loc.display}", field="uri") from None
    except Exception as exc:
        raise FetchError(f"cannot fetch {loc.display}: {type(exc).__name__}", field="uri") from None
    log.info("fetched %s via huggingface_hub in %.2fs -> %s", loc.display, time.monotonic() - t0, path)
    return _verify_local(path, loc.display, sha256, size, files)


# --------------------------------------------------------------------------------------------------------------
# fetch()
# --------------------------------------------------------------------------------------------------------------
def fetch(uri: str, settings: Settings, *, sha256: str | None = None, size: int | None = None,
          files: dict[str, str] | None = None, user_url: bool = False) -> Path:
    """Make `uri` available locally and return its local path.

    - An object URI (s3://b/k, https://..., hf://org/repo/file) -> a local FILE path in the cache.
    - A prefix URI ending in "/" (s3://b/prefix/, hf://org/repo) -> a local DIRECTORY in the cache holding every
      object under the prefix with the same relative paths. `files` optionally pins {relative_path: sha256}.
    - file:// and plain local paths -> returned as they are (no copy); sha256 still verified when given.
    Raises sd_core.errors.FetchError / ChecksumMismatch with a message naming the URI (never credentials).
    `user_url=True` (a URI from a request, already checked by sd_core.user_urls.check_user_url): http(s) downloads go
    through that policy (every redirect re-checked, pinned addresses) and every object is size-limited by
    SD_URL_MAX_BYTES.
    """
    loc = parse_uri(uri)
    sha256 = _check_sha256(sha256, "sha256")
    pins = {_safe_relpath(rel, loc.display): _check_sha256(v, f"files[{rel}]") for rel, v in (files or {}).items()}
    if loc.scheme == "file":
        return _verify_local(Path(loc.path), loc.display, sha256, size, pins)
    if loc.scheme == "hf":
        return _fetch_hf(loc, settings, sha256, size, pins)
    source = _S3Source(loc, settings) if loc.scheme == "s3" else _HttpSource(loc, settings, user_url=user_url)
    cache = WeightsCache.from_settings(settings)
    if loc.is_prefix:
        if sha256:
            raise FetchError(f"{loc.display} is a folder: pin its files' checksums with `files`, not `sha256`",
                             field="sha256")
        return _fetch_prefix(source, cache, settings, loc, pins)
    if pins:
        raise FetchError(f"{loc.display} is a single object: `files` pins belong to folder URIs ending in '/'",
                         field="files")
    return _fetch_object(source, cache, settings, loc, sha256, size, settings.url_max_bytes if user_url else None)


def _hit(cache: WeightsCache, entry: Entry, label: str) -> Path:
    cache.touch(entry)
    log.info("cache hit: %s -> %s", label, entry.local_path)
    return entry.local_path


def _fetch_object(source, cache: WeightsCache, settings: Settings, loc: Location, sha256: str | None,
                  size: int | None, max_bytes: int | None = None) -> Path:
    label = loc.display
    key = content_key(sha256) if sha256 else source.object_key()
    revalidate = settings.cache_head_on_hit and not sha256  # bytes pinned by sha256 never go stale
    fresh: RemoteObject | None = None

    def still_good(entry: Entry) -> bool:
        nonlocal fresh
        if not revalidate:
            return True
        if fresh is None:
            try:
                fresh = source.stat()
            except FetchError as exc:
                log.warning("cannot revalidate cached %s (%s); using the cached copy", label, exc)
                return True
        if fresh.matches(entry.meta):
            return True
        log.info("%s changed in the store (size/ETag differ from the cached copy); fetching it again", label)
        return False

    entry = cache.lookup(key)
    if entry is not None and still_good(entry):
        return _hit(cache, entry, label)
    with cache.lock(key, label):
        entry = cache.lookup(key)
        if entry is not None and still_good(entry):
            return _hit(cache, entry, label)
        obj = fresh or source.stat()
        if max_bytes is not None and obj.size is not None and obj.size > max_bytes:
            raise FetchError(f"{label} is {obj.size} bytes, larger than the limit of {max_bytes} bytes "
                             "(SD_URL_MAX_BYTES)", field="uri")
        if size is not None and obj.size is not None and obj.size != size:
            raise ChecksumMismatch(f"size mismatch for {label}: the store has {obj.size} bytes, the manifest says "
                                   f"{size}", field="size")
        obj.sha256 = sha256
        if cache.max_bytes is not None and obj.size:
            cache.evict(cache.max_bytes - obj.size, keep={key})
        staging = cache.staging_dir(key)
        files = _Transfer(source, staging, settings, label).run([obj])
        record = files[obj.rel]
        meta = {"kind": "file", "uri": label, "name": obj.rel, "size": record["size"], "etag": obj.etag,
                "sha256": sha256, "keyed_by": "sha256" if sha256 else "uri"}
        entry = cache.commit(key, staging, meta)
    _evict_after(cache, key)
    return entry.local_path


def _fetch_prefix(source, cache: WeightsCache, settings: Settings, loc: Location, pins: dict[str, str]) -> Path:
    label = loc.display
    key = source.prefix_key(pins)
    revalidate = settings.cache_head_on_hit
    listing: list[RemoteObject] | None = None

    def still_good(entry: Entry) -> bool:
        nonlocal listing
        if not revalidate:
            return True
        if listing is None:
            try:
                listing = source.list()
            except FetchError as exc:
                log.warning("cannot revalidate cached %s (%s); using the cached copy", label, exc)
                return True
        cached = entry.meta.get("files", {})
        if set(cached) == {o.rel for o in listing} and all(o.matches(cached[o.rel]) for o in listing):
            return True
        log.info("%s changed in the store; fetching it again", label)
        return False

    entry = cache.lookup(key)
    if entry is not None and still_good(entry):
        return _hit(cache, entry, label)
    with cache.lock(key, label):
        entry = cache.lookup(key)
        if entry is not None and still_good(entry):
            return _hit(cache, entry, label)
        objects = listing if listing is not None else source.list()
        if not objects:
            raise FetchError(f"no objects under {label}", field="uri")
        by_rel = {o.rel: o for o in objects}
        missing = sorted(set(pins) - set(by_rel))
        if missing:
            raise FetchError(f"pinned files missing under {label}: {', '.join(missing)}", field="files")
        for rel, digest in pins.items():
            by_rel[rel].sha256 = digest
        total = sum(o.size or 0 for o in objects)
        if cache.max_bytes is not None and total:
            cache.evict(cache.max_bytes - total, keep={key})
        staging = cache.staging_dir(key)
        stale = {p for p in (staging / "data").rglob("*") if p.is_file()} if (staging / "data").exists() else set()
        files = _Transfer(source, staging, settings, label).run(objects)
        for leftover in stale - {staging / "data" / rel for rel in files}:  # objects deleted from the store since
            with contextlib.suppress(OSError):
                leftover.unlink()
        meta = {"kind": "dir", "uri": label, "size": sum(f["size"] for f in files.values()), "files": files,
                "keyed_by": "uri"}
        entry = cache.commit(key, staging, meta)
    _evict_after(cache, key)
    return entry.local_path


def _evict_after(cache: WeightsCache, key: str) -> None:
    if cache.max_bytes is None:
        return
    try:
        cache.evict(keep={key})
    except OSError as exc:  # eviction is housekeeping: never fail a successful fetch because of it
        log.warning("cache eviction failed: %s", exc)


__all__ = ["GB", "Location", "RemoteObject", "fetch", "file_sha256", "parse_uri", "redact", "s3_client"]
