"""Ranged S3 reads through obstore (Rust object_store; it signs, signed_get moves the bytes); boto3 keeps the rest."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import FetchError, quote
from . import signed_get
from .objects import RemoteObject, Transient

log = logging.getLogger("sd_core.fetch")

# Chunks handed to the sink. Small on purpose: obstore then passes the HTTP client's own buffers through, which the
# allocator reuses; multi-MiB chunks are fresh allocations whose every page faults in (measured: 67k page faults
# and 3x s5cmd's system time for 256 MiB at 8 MiB chunks; 10k and s5cmd's at 256 KiB). obstore hands each chunk over
# as a new Python `bytes` (zero-filled, then copied into: ~15 % of the fetch's CPU, perf); at 64 KiB that stays in
# the CPU's cache on its way to pwrite. Python's per-chunk work (one pwrite, the progress count) stays small.
STREAM_CHUNK = 64 * 1024


def available() -> bool:
    """obstore is importable (a runtime requirement; a checkout without it falls back to boto3's reads)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


class _BotocoreCredentials:
    """obstore's credential_provider: botocore's own chain (env, profile, role...), refreshed as botocore refreshes."""

    def __init__(self, credentials):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.now(UTC) + timedelta(minutes=5)}


class _Captured(Exception):
    """Stops a boto3 request at `before-send`: its URL is all store_config wanted (nothing goes on the wire)."""


def store_config(client, bucket: str, key: str) -> dict:
    """The endpoint, addressing style and region boto3's `client` uses for a GET of `bucket`/`key`, for obstore.

    Read from the request boto3 itself prepares (stopped before it is sent: no request, the URL never logged), so a
    custom endpoint, path-style or virtual-hosted addressing and the regional host map exactly to what HEAD used.
    """
    seen: list[str] = []

    def capture(request, **kwargs):
        seen.append(request.url)
        raise _Captured()

    client.meta.events.register_first("before-send.s3.GetObject", capture, unique_id="sd-obstore-capture")
    try:
        client.get_object(Bucket=bucket, Key=key)
    except _Captured:
        pass
    finally:
        client.meta.events.unregister("before-send.s3.GetObject", unique_id="sd-obstore-capture")
    url = urlsplit(seen[0])
    origin = f"{url.scheme}://{url.netloc}"
    config = {"region": client.meta.region_name or "us-east-1", "allow_http": url.scheme == "http"}
    if url.netloc.split(":")[0].startswith(f"{bucket}."):
        config.update(endpoint=origin, virtual_hosted_style_request=True)
    else:
        path = url.path
        marker = f"/{bucket}/"
        prefix = path[: path.find(marker)] if marker in path else ""
        config.update(endpoint=origin + prefix, virtual_hosted_style_request=False)
    return config


# Environment that changes how botocore resolves an S3 client beyond env_config's rules: with any of it, boto3 decides.
_BOTOCORE_ONLY = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT",
                  "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT",
                  "AWS_S3_DISABLE_MULTIREGION_ACCESS_POINTS")
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


def env_config(settings, bucket: str, environ=None) -> dict | None:
    """What boto3 would use for `bucket` (endpoint, addressing style, region, keys), worked out from the environment
    alone, without importing boto3 (~0.5 s of CPU at a cold start), when the configuration is the plain serverless
    one: keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, no profile and no config file. None otherwise (boto3's own
    client is asked then). tests/sd_core/test_storage_obstore.py checks it against boto3's requests."""
    env = os.environ if environ is None else environ
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret or any(env.get(name) for name in _BOTOCORE_ONLY):
        return None
    config_file = env.get("AWS_CONFIG_FILE") or "~/.aws/config"
    if config_file != os.devnull and Path(config_file).expanduser().exists():
        return None  # (a profile there may set the region, endpoint or addressing style)
    region = env.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not re.fullmatch(r"[a-z]{2}-[a-z]+-\d", region) or region.startswith(("cn-", "us-gov-", "us-iso")):
        return None
    endpoint = settings.s3_endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    config = {"region": region, "access_key_id": key_id, "secret_access_key": secret}
    token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN")
    if token:
        config["token"] = token
    if endpoint:  # a custom endpoint: boto3 addresses buckets path-style
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc or url.query:
            return None
        config.update(endpoint=f"{url.scheme}://{url.netloc}{url.path.rstrip('/')}", virtual_hosted_style_request=False,
                      allow_http=url.scheme == "http")
        return config
    host = "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
    if _DNS_BUCKET.fullmatch(bucket) and not _is_ip(bucket):
        config.update(endpoint=f"https://{bucket}.{host}", virtual_hosted_style_request=True, allow_http=False)
    else:
        config.update(endpoint=f"https://{host}", virtual_hosted_style_request=False, allow_http=False)
    return config


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ObstoreReader:
    """`read_range` for one bucket through an obstore S3Store built from the boto3 client's own settings."""

    def __init__(self, bucket: str, settings, config: dict, credentials=None):
        from obstore.store import S3Store

        timeout = settings.fetch_timeout_s
        config = dict(config)
        options = {"connect_timeout": timedelta(seconds=min(10.0, timeout)),
                   # a whole part may take long on a slow link: bound the wait for bytes, not the request
                   "timeout": timedelta(hours=1), "read_timeout": timedelta(seconds=timeout),
                   "user_agent": "sd-serverless", "allow_http": config.pop("allow_http")}
        bundle = os.environ.get("AWS_CA_BUNDLE")
        self.ca_bundle = bundle if bundle and os.path.isfile(bundle) else None
        if self.ca_bundle:  # botocore's private CA bundle: trusted here too (added to the roots)
            options["root_certificate"] = Path(bundle).read_text()
        extra = {}
        if "access_key_id" not in config:
            extra = ({"credential_provider": _BotocoreCredentials(credentials)} if credentials
                     else {"skip_signature": True})
        self.timeout_s = timeout
        # bytes through presigned GETs (signed_get.py: spliced over http, a reused buffer over https); obstore's
        # stream for unsigned stores, behind a proxy, or where signing fails
        self.signed = "skip_signature" not in extra and signed_get.usable()
        self.store = S3Store(bucket, config=config, client_options=options,
                             retry_config={"max_retries": settings.fetch_retries,
                                           "retry_timeout": timedelta(seconds=max(60.0, 4 * timeout))}, **extra)

    @classmethod
    def from_boto3(cls, client, bucket: str, key: str, settings) -> ObstoreReader:
        import botocore.session

        return cls(bucket, settings, store_config(client, bucket, key), botocore.session.Session().get_credentials())

    def head(self, key: str) -> RemoteObject:
        """The object's size and ETag (the same quoted form boto3 returns). Any failure raises: boto3 explains it."""
        import obstore

        meta = obstore.head(self.store, key)
        return RemoteObject(key.rsplit("/", 1)[-1], key, int(meta["size"]), meta.get("e_tag"))

    def list(self, prefix: str) -> list[tuple[str, int, str | None]]:
        """(key, size, ETag) of every object under `prefix` (a folder URI's, ending in '/')."""
        import obstore

        found = []
        for batch in obstore.list(self.store, prefix=prefix.rstrip("/")):
            for meta in batch:
                key = str(meta["path"])
                if not key.startswith(prefix):
                    raise ValueError("listing outside the prefix")
                found.append((key, int(meta["size"]), meta.get("e_tag")))
        return found

    def read_range(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
        """Stream bytes [start, end] (end None: all) of `obj` into sink(chunk). Raises Transient (retry the part),
        or `Refused(exc)` for an answer that is final (the caller explains it with boto3)."""
        import obstore
        from obstore.exceptions import (
            NotFoundError,
            PermissionDeniedError,
            PreconditionError,
            UnauthenticatedError,
        )

        if self.signed:
            try:
                url = signed_get.sign(self.store, obj.ref)
            except Exception as exc:  # (a configuration obstore cannot sign): its stream reads instead
                log.info("presigned reads off for this bucket (%s); obstore streams", type(exc).__name__)
                self.signed = False
            else:
                try:
                    return signed_get.read_signed(url, start, end, obj.etag, sink, self.timeout_s, self.ca_bundle)
                except signed_get.Final as exc:
                    raise Refused(str(exc)) from None
        options = {}
        if end is not None:
            options["range"] = (start, end + 1)
        if obj.etag:
            options["if_match"] = obj.etag
        final = (FileNotFoundError, NotFoundError, PermissionDeniedError, PreconditionError, UnauthenticatedError,
                 ValueError)
        try:
            stream = obstore.get(self.store, obj.ref, options=options).stream(min_chunk_size=STREAM_CHUNK)
        except final as exc:
            raise Refused(type(exc).__name__) from None
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise Transient(type(exc).__name__) from None  # (its message holds the URL: never shown)
        while True:
            try:
                chunk = next(stream)
            except StopIteration:
                return
            except (obstore.exceptions.BaseError, OSError) as exc:
                raise Transient(f"{type(exc).__name__} while streaming") from None
            sink(chunk)  # (outside the try: a failed write into the cache is the transfer's to report)


class Refused(Exception):
    """A final error answer to an obstore read (missing, denied, changed): S3Source explains it through boto3."""


_LOCK = threading.Lock()


def reader_for(source, key: str) -> ObstoreReader | None:
    """The S3Source's ObstoreReader (built on first use); None when SD_FETCH_ENGINE or a missing obstore says boto3."""
    engine = source.settings.fetch_engine.strip().lower()
    if engine not in ("auto", "obstore", "boto3"):
        raise FetchError(f"SD_FETCH_ENGINE must be auto, obstore or boto3, not {quote(engine)}",
                         field="SD_FETCH_ENGINE")
    if engine == "boto3":
        return None
    if not available():
        if engine == "obstore":
            raise FetchError("SD_FETCH_ENGINE=obstore but obstore is not installed (pip install -r requirements.txt)",
                             field="SD_FETCH_ENGINE")
        return None
    with _LOCK:
        reader = getattr(source, "_obstore_reader", None)
        if reader is None:
            try:
                config = env_config(source.settings, source.bucket)
                reader = (ObstoreReader(source.bucket, source.settings, config) if config is not None
                          else ObstoreReader.from_boto3(source.client, source.bucket, key, source.settings))
            except Exception as exc:  # (a configuration obstore cannot express): boto3 moves the bytes instead
                if engine == "obstore":
                    raise FetchError(f"cannot set up obstore for s3://{source.bucket}: {type(exc).__name__}",
                                     field="SD_FETCH_ENGINE") from None
                log.warning("obstore cannot read s3://%s (%s); using boto3", source.bucket, type(exc).__name__)
                reader = False
            source._obstore_reader = reader
    return reader or None
