"""Delivering result images: inline base64 within a size limit, or uploaded to an S3 bucket as presigned URLs."""

from __future__ import annotations

import base64
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import InvalidRequest, UploadError
from .schema import GeneratedImage
from .settings import Settings
from .storage import redact, s3_client, s3_error_kind

log = logging.getLogger("sd_core.uploads")

MAX_URL_TTL_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
MB = 1_000_000
# Virtual-hosted AWS endpoints name the bucket in the host: <bucket>.s3.<region>.amazonaws.com (or .s3-<region>.).
_AWS_VIRTUAL_HOST = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]*?)\.s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class OutputBucket:
    """Where result images go: a bucket and key prefix on an S3-compatible endpoint, with optional own credentials."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # None: boto3's default (AWS, or AWS_ENDPOINT_URL)
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    url_ttl_s: int = MAX_URL_TTL_S

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def describe(self) -> str:
        """For logs: the bucket URI and endpoint, never credentials."""
        where = redact(self.endpoint_url) if self.endpoint_url else "the default S3 endpoint"
        return f"{self.uri} at {where}"


def _split_endpoint(url: str) -> tuple[str, str | None, str, str | None]:
    """BUCKET_ENDPOINT_URL -> (endpoint, bucket or None, key prefix, region or None).

    Path style ``https://host[:port]/bucket/prefix`` (MinIO, R2, B2, SeaweedFS, DigitalOcean) or AWS virtual-hosted
    style ``https://bucket.s3.region.amazonaws.com/prefix``.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UploadError("must be an http(s):// URL of an S3-compatible endpoint", field="BUCKET_ENDPOINT_URL")
    path = [p for p in parts.path.split("/") if p]
    aws = _AWS_VIRTUAL_HOST.match(parts.hostname or "")
    if aws:
        region = aws.group("region")
        endpoint = f"{parts.scheme}://s3.{region}.amazonaws.com" if region else f"{parts.scheme}://s3.amazonaws.com"
        return endpoint, aws.group("bucket"), "/".join(path), region
    endpoint = f"{parts.scheme}://{parts.netloc}"
    return endpoint, (path[0] if path else None), "/".join(path[1:]), None


def output_bucket(settings: Settings) -> OutputBucket | None:
    """The configured output bucket, or None (results go inline as base64). Raises UploadError when misconfigured.

    SD_OUTPUT_URI (``s3://bucket/prefix``) names bucket and prefix; BUCKET_ENDPOINT_URL (RunPod's convention) names
    the endpoint and, when SD_OUTPUT_URI is not set, the bucket as its first path segment. Credentials: the pair
    BUCKET_ACCESS_KEY_ID / BUCKET_SECRET_ACCESS_KEY, else boto3's own chain (AWS_ACCESS_KEY_ID, roles, ...).
    """
    if not settings.output_uri and not settings.bucket_endpoint_url:
        return None
    endpoint, bucket, prefix, region = None, None, "", None
    if settings.bucket_endpoint_url:
        endpoint, bucket, prefix, region = _split_endpoint(settings.bucket_endpoint_url)
    if settings.output_uri:
        parts = urlsplit(settings.output_uri.strip())
        if parts.scheme != "s3" or not parts.netloc:
            raise UploadError(f"must look like s3://bucket/prefix (got {redact(settings.output_uri)!r})",
                              field="SD_OUTPUT_URI")
        bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise UploadError(
            "names no bucket: give it as the URL's path (https://host/bucket) or set SD_OUTPUT_URI=s3://bucket/prefix",
            field="BUCKET_ENDPOINT_URL",
        )
    if bool(settings.bucket_access_key_id) != bool(settings.bucket_secret_access_key):
        raise UploadError("BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY must be set together",
                          field="credentials")
    if not 1 <= settings.output_url_ttl_s <= MAX_URL_TTL_S:
        raise UploadError(f"must be between 1 and {MAX_URL_TTL_S} seconds (7 days, the longest a presigned URL lives)",
                          field="SD_OUTPUT_URL_TTL_S")
    return OutputBucket(
        bucket=bucket, prefix=prefix, endpoint_url=endpoint or settings.s3_endpoint_url or None, region=region,
        access_key_id=settings.bucket_access_key_id, secret_access_key=settings.bucket_secret_access_key,
        url_ttl_s=settings.output_url_ttl_s,
    )


class Uploader:
    """Uploads encoded images to an OutputBucket (in parallel) and answers presigned GET URLs. Thread-safe."""

    def __init__(self, target: OutputBucket):
        self.target = target
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                custom = self.target.endpoint_url and "amazonaws.com" not in self.target.endpoint_url
                self._client = s3_client(
                    endpoint_url=self.target.endpoint_url, region=self.target.region,
                    access_key_id=self.target.access_key_id, secret_access_key=self.target.secret_access_key,
                    connect_timeout=10, read_timeout=60, max_attempts=4,
                    # Path-style addressing works on every S3-compatible store; AWS prefers virtual hosts.
                    path_style=bool(custom),
                )
            return self._client

    def connect(self) -> None:
        """Build the S3 client now (no request is sent): a cold start pays it (boto3's import and client build,
        ~0.7 s here), not the first job's upload."""
        assert self.client is not None

    def key(self, job_id: str, index: int, image: GeneratedImage) -> str:
        job = _UNSAFE_KEY_CHARS.sub("_", job_id or "job").strip("._") or "job"
        name = f"{job}/{index}-{image.seed}.{image.extension}"
        return f"{self.target.prefix}/{name}" if self.target.prefix else name

    def upload(self, images: list[GeneratedImage], job_id: str) -> list[str]:
        """Upload every image; returns their presigned URLs in the same order. Raises UploadError."""
        if not images:
            return []
        keys = [self.key(job_id, i, image) for i, image in enumerate(images)]
        client = self.client
        with ThreadPoolExecutor(max_workers=min(8, len(images)), thread_name_prefix="sd-upload") as pool:
            return list(pool.map(lambda pair: self._put(client, *pair), zip(keys, images, strict=True)))

    def _put(self, client, key: str, image: GeneratedImage) -> str:
        try:
            client.put_object(Bucket=self.target.bucket, Key=key, Body=image.data, ContentType=image.mime_type)
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": self.target.bucket, "Key": key}, ExpiresIn=self.target.url_ttl_s
            )
        except Exception as exc:
            raise self._explain(exc, key) from None

    def _explain(self, exc: Exception, key: str) -> UploadError:
        where = f"s3://{self.target.bucket}/{key} ({self.target.describe()})"
        kind, code, _ = s3_error_kind(exc)
        if code:  # the store answered with an error
            hint = {
                "no_bucket": "the bucket does not exist",
                "denied": "the credentials may not write there (needs s3:PutObject)",
                "bad_key_id": "the access key id is unknown (check BUCKET_ACCESS_KEY_ID)",
                "bad_secret": "the secret does not match the key id (check BUCKET_SECRET_ACCESS_KEY)",
            }.get(kind, "the store refused the upload")
            return UploadError(f"upload of {where} failed: {code}, {hint}", field="output")
        if kind == "no_credentials":
            return UploadError(f"no credentials for the output bucket {self.target.uri}: set BUCKET_ACCESS_KEY_ID "
                               "and BUCKET_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
                               field="output")
        if kind == "untrusted":
            return UploadError(f"the TLS certificate of the output bucket endpoint for {where} is not trusted "
                               "(verification failed): point AWS_CA_BUNDLE at the CA bundle that signed it",
                               field="output")
        if kind == "unreachable":
            return UploadError(f"cannot reach the output bucket endpoint for {where}", field="output")
        if kind == "other":
            log.exception("unexpected upload error")
        return UploadError(f"upload of {where} failed: {type(exc).__name__}", field="output")


def inline_images(images: list[GeneratedImage]) -> list[str]:
    """The images as bare base64 strings (no ``data:`` prefix), in order."""
    return [base64.b64encode(image.data).decode("ascii") for image in images]


def check_inline_size(nbytes: int, settings: Settings) -> None:
    """Refuse an inline result larger than SD_MAX_RESPONSE_MB, naming the way out (a bucket, fewer/smaller images)."""
    limit = settings.max_response_mb * MB
    if nbytes > limit:
        raise InvalidRequest(
            f"the result is {nbytes / MB:.2f} MB of base64 images, over this worker's limit of "
            f"{settings.max_response_mb:g} MB (SD_MAX_RESPONSE_MB; RunPod refuses results over about 10 MB on /run "
            "and 20 MB on /runsync). Configure an output bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
            "BUCKET_SECRET_ACCESS_KEY, or SD_OUTPUT_URI) to get URLs instead, or ask for fewer or smaller images "
            "(output_format jpeg/webp is smaller than png)",
            field="output",
        )
