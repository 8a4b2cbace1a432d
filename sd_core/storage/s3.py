"""S3 access shared by fetching and uploads: one boto3 client factory, one error classifier, and the s3:// source."""

from __future__ import annotations

import contextlib
import functools
import json
from functools import cached_property

from ..errors import FetchError
from ..settings import Settings
from .cache import uri_key
from .objects import CHUNK, RemoteObject, Transient
from .uris import Location, redact, safe_relpath


def s3_client(settings: Settings | None = None, *, concurrency: int | None = None, endpoint_url: str | None = None,
              region: str | None = None, access_key_id: str | None = None, secret_access_key: str | None = None,
              connect_timeout: float | None = None, read_timeout: float | None = None,
              max_attempts: int | None = None, path_style: bool = False):
    """A boto3 S3 client: boto3's credential/region chain, bounded timeouts/retries, "when_required" checksums.

    With `settings` (weights): SD_S3_ENDPOINT_URL and the SD_FETCH_* timeouts/retries; one client serves all threads
    of a fetch (boto3 clients are thread-safe) and its pool holds a connection per part. The keywords override them
    (uploads: their own endpoint, region, credentials, path-style addressing for non-AWS stores).
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    connections = concurrency or (settings.fetch_concurrency if settings is not None else 8)
    timeout = settings.fetch_timeout_s if settings is not None else 60.0
    attempts = settings.fetch_retries + 1 if settings is not None else 4
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout if connect_timeout is not None else min(10.0, timeout),
        read_timeout=read_timeout if read_timeout is not None else timeout,
        retries={"mode": "standard", "max_attempts": max_attempts or attempts},
        max_pool_connections=max(10, connections + 2),
        # Ranged GETs carry no full-object checksum (we verify sha256 ourselves); "when_required" also keeps
        # uploads compatible with stores that reject the newer default checksum trailers (older MinIO, B2).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="sd-serverless",
        **({"s3": {"addressing_style": "path"}} if path_style else {}),
    )
    # A fresh session per call sees current credentials; the shared loader spares re-parsing the S3 model (~0.1 s).
    core = botocore.session.Session()
    core.register_component("data_loader", _botocore_loader())
    session = boto3.session.Session(botocore_session=core)
    if endpoint_url is None and settings is not None:
        endpoint_url = settings.s3_endpoint_url or None
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
                          aws_secret_access_key=secret_access_key, config=config)


@functools.cache
def _botocore_loader():
    import botocore.loaders

    return botocore.loaders.create_loader()


# S3 error codes, by what they mean for the caller (HEAD answers carry only the HTTP status as their code).
_KINDS = {
    "not_found": ("NoSuchKey", "404", "NotFound", "Not Found"),
    "no_bucket": ("NoSuchBucket",),
    "bad_key_id": ("InvalidAccessKeyId",),
    "bad_secret": ("SignatureDoesNotMatch",),
    "expired": ("ExpiredToken", "TokenRefreshRequired", "InvalidToken"),
    "denied": ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"),
    "changed": ("PreconditionFailed", "412"),
}
PROBED_CODES = ("400", "403", "404", "Forbidden", "NotFound", "Not Found", "BadRequest")


def s3_error_kind(exc: Exception) -> tuple[str, str, int | None]:
    """What a boto3 error means: (kind, S3 error code, HTTP status). Kinds: the keys of _KINDS, "refused" (another
    error answer), "no_credentials", "partial_credentials", "unreachable", "untrusted" (the endpoint's TLS certificate
    failed verification), "client" (another botocore error) and
    "other" (not from botocore). The one place that knows botocore's exceptions; callers word their own messages."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        CredentialRetrievalError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        SSLError,
    )

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "")) or "?"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        kind = next((k for k, codes in _KINDS.items() if code in codes), "refused")
        return kind, code, status
    if isinstance(exc, NoCredentialsError):
        return "no_credentials", "", None
    if isinstance(exc, (PartialCredentialsError, CredentialRetrievalError)):
        return "partial_credentials", "", None
    if isinstance(exc, SSLError):
        return "untrusted", "", None
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return "unreachable", "", None
    return ("client" if isinstance(exc, BotoCoreError) else "other"), "", None


class S3Source:
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
        from botocore.exceptions import ClientError

        uri = self._uri(key)
        kind, code, status = s3_error_kind(exc)
        if probe and isinstance(exc, ClientError) and code in PROBED_CODES:
            # HEAD answers carry no error body: one tiny GET tells a wrong secret from a missing permission.
            try:
                self.client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
            except ClientError as detail:
                return self._explain(detail, key, probe=False)
            except Exception:
                pass
        where = self.endpoint
        messages = {
            "not_found": (f"object not found: {uri} (at {where})", "uri"),
            "no_bucket": (f"bucket {self.bucket!r} does not exist at {where} (fetching {uri})", "uri"),
            "bad_key_id": (f"S3 credentials rejected by {where} while fetching {uri}: the access key id is unknown "
                           "(check AWS_ACCESS_KEY_ID / AWS_PROFILE)", "credentials"),
            "bad_secret": (f"S3 credentials rejected by {where} while fetching {uri}: the secret key does not match "
                           "the access key id (check AWS_SECRET_ACCESS_KEY)", "credentials"),
            "expired": (f"S3 credentials for {where} have expired or are invalid ({code}) while fetching {uri} "
                        "(check AWS_SESSION_TOKEN / your credential source)", "credentials"),
            "denied": (f"access denied to {uri} at {where}: the credentials lack read permission (s3:GetObject, "
                       "s3:ListBucket) or are wrong", "credentials"),
            "changed": (f"{uri} changed in the store during the download (ETag differs); fetch again", "uri"),
            "refused": (f"S3 error {code or '?'} (HTTP {status}) while fetching {uri} from {where}", "uri"),
            "no_credentials": (f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or AWS_PROFILE / an instance role)", "credentials"),
            "partial_credentials": (f"incomplete S3 credentials for {uri}: {exc}", "credentials"),
            "untrusted": (f"the TLS certificate of the S3 endpoint {where} is not trusted (verification failed) while "
                          f"fetching {uri}: point AWS_CA_BUNDLE at the CA bundle that signed it", "AWS_CA_BUNDLE"),
            "unreachable": (f"cannot reach the S3 endpoint {where} for {uri} after {self.settings.fetch_retries + 1} "
                            f"attempts ({type(exc).__name__}); check SD_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the "
                            "network", "uri"),
        }
        message, field = messages.get(kind, (f"S3 client error while fetching {uri}: {type(exc).__name__}: {exc}",
                                             "uri"))
        return FetchError(message, field=field)

    # --- operations ---
    def _obstore(self):
        from .s3_obstore import reader_for

        return reader_for(self, self.loc.path)

    def stat(self) -> RemoteObject:
        key = self.loc.path
        if (reader := self._obstore()) is not None:
            try:
                obj = reader.head(key)
                obj.rel = self.loc.name
                return obj
            except Exception:  # boto3 asks again below: it answers, or explains the error
                pass
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
        if (reader := self._obstore()) is not None:
            try:
                return [RemoteObject(safe_relpath(key[len(prefix):], self.loc.display), key, size, etag)
                        for key, size, etag in reader.list(prefix) if not key.endswith("/")]
            except FetchError:
                raise
            except Exception:  # boto3 lists again below: it answers, or explains the error
                pass
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/"):
                        continue  # a "folder" marker object
                    rel = safe_relpath(key[len(prefix):], self.loc.display)
                    found.append(RemoteObject(rel, key, int(item["Size"]), item.get("ETag")))
        except FetchError:
            raise
        except Exception as exc:
            raise self._explain(exc, prefix, probe=False) from None
        return found

    def read_range(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
        from .s3_obstore import Refused, reader_for

        reader = reader_for(self, obj.ref)
        if reader is None:
            return self._read_range_boto3(obj, start, end, sink)
        try:
            return reader.read_range(obj, start, end, sink)
        except Refused:
            pass
        # A final answer (missing, denied, changed): the same request through boto3 says exactly what it means.
        kwargs = {"Bucket": self.bucket, "Key": obj.ref, "Range": f"bytes={start}-{start}"}
        if obj.etag:
            kwargs["IfMatch"] = obj.etag
        try:
            self.client.get_object(**kwargs)["Body"].close()
        except Exception as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or status == 429:
                raise Transient(f"HTTP {status}") from None
            raise self._explain(exc, obj.ref) from None
        raise Transient("refused, then answered")

    def _read_range_boto3(self, obj: RemoteObject, start: int, end: int | None, sink) -> None:
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
                raise Transient(f"HTTP {status}") from None
            raise self._explain(exc, obj.ref, probe=False) from None
        except Exception as exc:  # connection errors: botocore already retried them
            raise self._explain(exc, obj.ref) from None
        body = response["Body"]
        expected = (end - start + 1) if end is not None else obj.size
        if expected is not None and int(response.get("ContentLength", -1)) != expected:
            body.close()
            raise Transient(f"Content-Length {response.get('ContentLength')} instead of {expected}")
        try:
            for chunk in body.iter_chunks(CHUNK):
                sink(chunk)
        except (BotoCoreError, Urllib3Error, ConnectionError, TimeoutError) as exc:
            raise Transient(f"{type(exc).__name__} while streaming") from None
        finally:
            body.close()
