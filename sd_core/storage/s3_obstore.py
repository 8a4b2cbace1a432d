"""Ranged S3 reads through obstore (Rust object_store): bytes move off the GIL; boto3 keeps the metadata calls."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from ..errors import FetchError, quote
from .objects import CHUNK, RemoteObject, Transient

log = logging.getLogger("sd_core.fetch")

# Chunks handed to the sink: large enough that Python's per-chunk work (one pwrite, progress) is negligible.
STREAM_CHUNK = 4 * CHUNK


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


def store_config(client, bucket: str, key: str) -> dict:
    """The endpoint, addressing style and region boto3's `client` uses for `bucket`, for obstore's S3Store.

    Read from the URL boto3 itself builds for a GET (a presigned URL, made locally: no request, never logged), so a
    custom endpoint, path-style or virtual-hosted addressing and the region map exactly to what HEAD used.
    """
    url = urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=60))
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


class ObstoreReader:
    """`read_range` for one bucket through an obstore S3Store built from the boto3 client's own settings."""

    def __init__(self, client, bucket: str, key: str, settings):
        import botocore.session
        from obstore.store import S3Store

        credentials = botocore.session.Session().get_credentials()
        timeout = settings.fetch_timeout_s
        options = {"connect_timeout": timedelta(seconds=min(10.0, timeout)),
                   # a whole part may take long on a slow link: bound the wait for bytes, not the request
                   "timeout": timedelta(hours=1), "read_timeout": timedelta(seconds=timeout),
                   "user_agent": "sd-serverless", "allow_http": False}
        config = store_config(client, bucket, key)
        options["allow_http"] = config.pop("allow_http")
        self.store = S3Store(bucket, config=config, client_options=options,
                             retry_config={"max_retries": settings.fetch_retries,
                                           "retry_timeout": timedelta(seconds=max(60.0, 4 * timeout))},
                             credential_provider=_BotocoreCredentials(credentials) if credentials else None,
                             **({} if credentials else {"skip_signature": True}))

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
                reader = ObstoreReader(source.client, source.bucket, key, source.settings)
            except Exception as exc:  # (a configuration obstore cannot express): boto3 moves the bytes instead
                if engine == "obstore":
                    raise FetchError(f"cannot set up obstore for s3://{source.bucket}: {type(exc).__name__}",
                                     field="SD_FETCH_ENGINE") from None
                log.warning("obstore cannot read s3://%s (%s); using boto3", source.bucket, type(exc).__name__)
                reader = False
            source._obstore_reader = reader
    return reader or None
