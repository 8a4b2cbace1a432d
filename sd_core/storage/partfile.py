"""One object being downloaded: its pre-allocated partial file, the parts record that lets a restart resume, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import threading
import time
from pathlib import Path

from ..errors import FetchError
from .cache import write_json_atomic
from .objects import CHUNK, DISK_FULL, RemoteObject


class PartialFile:
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
        self._hash_lock = threading.Lock()  # the hasher is fed by the writer at the frontier, or by advance_hash
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

    def hash_live(self, data, offset: int) -> None:
        """Hash bytes just written at `offset` straight from memory when they extend the hashed prefix (the part at
        the front streams in order), so most of an object is hashed without reading it back from the file."""
        if self.hasher is None or offset != self.hash_pos or not self._hash_lock.acquire(blocking=False):
            return
        try:
            if offset == self.hash_pos:
                self.hasher.update(data)
                self.hash_pos += len(data)
        finally:
            self._hash_lock.release()

    def restart_hash(self) -> None:
        """Forget what was hashed (a streamed, unranged object starts again from byte 0 on a retry)."""
        if self.hasher is not None:
            with self._hash_lock:
                self.hasher = hashlib.sha256()
                self.hash_pos = 0
                self.hashed = 0

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
        with self._hash_lock:
            if self.ranged and limit > self.hash_pos and self._hash_mapped(limit):
                return
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
                self.hash_pos = pos

    def _hash_mapped(self, limit: int) -> bool:
        """Hash [hash_pos, limit) where it lies in the page cache (mmap: no copy back into Python; costs what
        hashing from memory costs). Only for ranged objects: their file keeps its final size all along, so a mapping
        never outlives its bytes. False where the file cannot be mapped (then: preadv)."""
        base = self.hash_pos - self.hash_pos % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(self.fd).st_size < limit:  # (never map past the end: reading there kills the process)
                return False
            mapped = mmap.mmap(self.fd, limit - base, prot=mmap.PROT_READ, offset=base)
        except (OSError, ValueError):
            return False
        with mapped:
            with memoryview(mapped)[self.hash_pos - base:] as view:
                self.hasher.update(view)
        self.hash_pos = limit
        return True

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
