"""Fetching weights into the local cache: s3://, http(s)://, hf://, file:// and paths (parallel, verified, resumable).

``fetch(uri, settings, sha256=..., files=...)`` is the one entry point. Remote objects are downloaded with parallel
ranged GETs (one shared boto3 client / per-thread HTTP sessions, ``SD_FETCH_CONCURRENCY`` connections,
``SD_FETCH_PART_MB`` per request) straight into a pre-allocated file: nothing is buffered whole in memory. Each part is
retried with backoff; completed parts are recorded in a sidecar file so that a download interrupted by a crash or a
restart resumes where it stopped; every part request carries ``If-Match: <etag>`` so a resumed or parallel download
never mixes two versions of an object. A pinned sha256 is computed while the parts arrive (in order, from the page
cache) and checked at the end: a mismatch deletes the bytes and fetches once more, then raises ChecksumMismatch.

Modules: uris (parsing, redaction), s3 / http (sources; s3 also serves uploads), objects (what sources hand the
transfer), partfile + transfer (the resumable download engine), verify (sha256, local paths, hf://), hf_cache (hf://
from a read-only hub cache: RunPod's cached models), cache (layout, keys, locking, eviction), progress (log lines),
fetching (fetch() and the cached-fetch shape).
"""

from .fetching import fetch
from .s3 import s3_client, s3_error_kind
from .uris import parse_uri, redact
from .verify import file_sha256

__all__ = ["fetch", "file_sha256", "parse_uri", "redact", "s3_client", "s3_error_kind"]
