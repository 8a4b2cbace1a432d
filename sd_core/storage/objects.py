"""What a source hands the transfer: RemoteObject, the retry/abort signals, the backoff, the disk-full errnos."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

CHUNK = 1 << 20  # bytes per socket read / pwrite
# A write into the cache that failed because the disk (or the process's file size limit, or a quota) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class Transient(Exception):
    """A failure worth retrying (connection reset, timeout, short read, 5xx)."""


class Stopped(Exception):
    """The transfer is being aborted (another part failed for good)."""


@dataclass
class RemoteObject:
    """One object to download: `rel` is its path inside the cache entry."""

    rel: str
    ref: str  # the source's own name for it (S3 key, URL)
    size: int | None
    etag: str | None
    sha256: str | None = None
    ranges: bool = True  # the server answers ranged GETs
    redirected: bool = False  # the URL answered through a redirect (http sources: read through requests)

    def matches(self, meta: dict) -> bool:
        return meta.get("size") == self.size and (meta.get("etag") or None) == (self.etag or None)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (exponential, capped at 10 s, jittered)."""
    return min(0.25 * 2**attempt, 10.0) * random.uniform(0.5, 1.5)
