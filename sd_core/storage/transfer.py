"""The resumable download engine: parallel ranged GETs from one source into one staging folder, verified."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ..errors import ChecksumMismatch, FetchError
from ..settings import Settings
from .cache import write_json_atomic
from .objects import DISK_FULL, RemoteObject, Stopped, Transient, backoff
from .partfile import PartialFile
from .progress import FetchProgress

log = logging.getLogger("sd_core.fetch")


class Transfer:
    """Downloads objects from one source into one staging folder with a shared pool of connections.

    ``run(objects)`` opens (or resumes) one PartialFile per object, fetches the missing parts on a thread pool, hashes
    the bytes in order as they arrive, records completed parts, and publishes each object under staging/data/ once it
    is complete and verified. A failed write into the cache stops everything; a full disk deletes the partial files.
    """

    def __init__(self, source, staging: Path, settings: Settings, label: str, on_file=None):
        self.source = source
        self.staging = staging
        self.settings = settings
        self.label = label
        self.part_size = max(64 * 1024, int(settings.fetch_part_mb * 1024 * 1024))
        self.stop = threading.Event()
        self.progress: FetchProgress | None = None
        self.journal_path = staging / "journal.json"
        self.journal: dict = {}
        self.jobs: list[PartialFile] = []
        self.pending: dict[Future, tuple[PartialFile, int]] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.failed: tuple[PartialFile, OSError] | None = None  # a write into the cache that failed (a full disk...)
        self.on_file = on_file  # called with an object's rel once it is complete under staging/data/ (verified)

    def run(self, objects: list[RemoteObject]) -> dict[str, dict]:
        """Fetch every object to staging/data/<rel>. Returns {rel: {size, etag, sha256}} for meta.json."""
        self.staging.mkdir(parents=True, exist_ok=True)
        self.journal = self._load_journal()
        self.jobs = [self._job(obj) for obj in objects]
        todo = [j for j in self.jobs if not j.finished]
        for job in self.jobs:
            if job.finished and self.on_file is not None:  # complete from an earlier, interrupted run
                self.on_file(job.obj.rel)
        self._open(todo)
        self._start_progress(todo)
        parallel = max(1, min(self.settings.fetch_concurrency, sum(j.nparts - len(j.done) for j in todo) or 1))
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sd-fetch")
        ok = False
        try:
            for job in todo:
                self._submit(job)
            self._drive()
            ok = self.failed is None
        finally:
            unfinished = self._shut_down()
            self.progress.finish(ok=ok)
        if self.failed is not None:
            raise self._write_error(*self.failed, unfinished)
        return {j.obj.rel: {"size": j.obj.size if j.obj.size is not None else j.final.stat().st_size,
                            "etag": j.obj.etag, "sha256": j.obj.sha256} for j in self.jobs}

    # --- the steps of run() ---
    def _load_journal(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.journal_path.read_text())
        return {}

    def _job(self, obj: RemoteObject) -> PartialFile:
        """The object's PartialFile; already finished when the journal records it complete with the same version."""
        job = PartialFile(obj, self.staging, self.part_size)
        done = self.journal.get(obj.rel)
        if (done and obj.matches(done) and (done.get("sha256") or None) == (obj.sha256 or done.get("sha256"))
                and job.final.exists() and job.final.stat().st_size == obj.size):
            job.finished = True
        return job

    def _open(self, todo: list[PartialFile]) -> None:
        """Open (resuming where possible) every partial file, or none: a failure closes those already open."""
        for job in todo:
            try:
                job.open(resume=True)
            except BaseException as exc:
                for other in todo:
                    other.close()
                if isinstance(exc, OSError):
                    raise self._write_error(job, exc, todo) from None
                raise

    def _start_progress(self, todo: list[PartialFile]) -> None:
        jobs = self.jobs
        already = sum(j.obj.size or 0 for j in jobs if j.finished) + sum(j.present_bytes for j in todo)
        total = sum(j.obj.size or 0 for j in jobs) if all(j.obj.size is not None for j in jobs) else None
        if already and todo:
            log.info("resuming %s: %.1f MB already downloaded", self.label, already / 1e6)
        self.progress = FetchProgress(self.label, total, self.settings.fetch_progress_s, already=already)
        self.progress.start()

    def _submit(self, job: PartialFile) -> None:
        for i in range(job.nparts):
            if i not in job.done:
                self.pending[self.pool.submit(self._fetch_part, job, i)] = (job, i)

    def _drive(self) -> None:
        """Until every object is finished (or a write failed): collect finished parts, then advance each object."""
        while self.failed is None:
            active = [j for j in self.jobs if not j.finished]
            if not active:
                return
            self._collect()
            for job in active:
                if self.failed is not None:
                    return
                try:
                    self._advance(job)
                except OSError as exc:
                    self.failed = (job, exc)

    def _collect(self) -> None:
        """Wait (briefly) for parts to finish; record them. A part that failed for good raises its error."""
        if not self.pending:
            return
        finished, _ = wait(list(self.pending), timeout=0.25, return_when=FIRST_COMPLETED)
        for future in finished:
            job, i = self.pending.pop(future)
            exc = future.exception()
            if isinstance(exc, OSError):
                self.failed = (job, exc)
                return
            if exc is not None and not isinstance(exc, Stopped):
                raise exc
            job.done.add(i)

    def _advance(self, job: PartialFile) -> None:
        """Hash what arrived, record the completed parts, and publish the object once complete."""
        job.advance_hash()
        job.checkpoint(self.settings.fetch_fsync)
        if len(job.done) == job.nparts and (job.hasher is None or job.hashed == job.nparts):
            if not self._finish(job):
                self._submit(job)  # checksum mismatch: one more try from zero

    def _shut_down(self) -> list[PartialFile]:
        """Stop the workers; record (or, after a full disk, delete) what unfinished objects hold. Returns them."""
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for future, (job, i) in self.pending.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                job.done.add(i)
        unfinished = [job for job in self.jobs if not job.finished]
        disk_full = self.failed is not None and self.failed[1].errno in DISK_FULL
        for job in unfinished:
            if not disk_full:
                with contextlib.suppress(Exception):
                    job.checkpoint(self.settings.fetch_fsync, force=True)
            job.close()
        for job in self.jobs:
            job.close()
        return unfinished

    def _write_error(self, job: PartialFile, exc: OSError, unfinished: list[PartialFile]) -> FetchError:
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

    def _fetch_part(self, job: PartialFile, i: int) -> None:
        start, end = job.part_range(i)
        retries = self.settings.fetch_retries
        for attempt in range(retries + 1):
            if self.stop.is_set():
                raise Stopped()
            sink = PartSink(job, i, start, self.stop, self.progress)
            try:
                if not job.ranged:
                    os.ftruncate(job.fd, 0)
                    job.restart_hash()
                self.source.read_range(job.obj, start, end, sink)
                expected = (end - start + 1) if end is not None else job.obj.size
                if expected is not None and sink.written != expected:
                    raise Transient(f"got {sink.written} of {expected} bytes")
                if not job.ranged:
                    job.streamed = sink.written
                return
            except Transient as exc:
                self.progress.add(-sink.written)
                job.filled[i] = 0
                where = f"part {i + 1}/{job.nparts} of {self.label}" if job.nparts > 1 else self.label
                if attempt == retries:
                    raise FetchError(f"fetching {where} failed after {retries + 1} attempts: {exc}",
                                     field="uri") from None
                delay = backoff(attempt)
                log.warning("%s: %s; retry %d/%d in %.1fs", where, exc, attempt + 1, retries, delay)
                if self.stop.wait(delay):
                    raise Stopped() from None

    def _finish(self, job: PartialFile) -> bool:
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
                job.discard()
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
        self.journal[obj.rel] = {"size": size, "etag": obj.etag, "sha256": obj.sha256}
        write_json_atomic(self.journal_path, self.journal)
        if self.on_file is not None:
            self.on_file(obj.rel)
        return True

    def _where(self, job: PartialFile) -> str:
        name = PurePosixPath(urlsplit(self.label).path.rstrip("/")).name  # (the label has no secrets to lose)
        return self.label if job.obj.rel == name else f"{self.label.rstrip('/')}/{job.obj.rel}"


class PartSink:
    """Where one part's bytes go: a source hands chunks to it (written into the partial file, hashed when they extend
    the hashed prefix), or puts bytes into target() itself (a splice) and reports them with landed(n)."""

    def __init__(self, job: PartialFile, i: int, start: int, stop: threading.Event, progress: FetchProgress):
        self.job, self.i, self.start, self.stop, self.progress = job, i, start, stop, progress
        self.written = 0

    def __call__(self, chunk) -> None:
        if self.stop.is_set():
            raise Stopped()
        offset = self.start + self.written
        self.job.write(chunk, offset)
        self.job.hash_live(chunk, offset)
        self._count(len(chunk))

    def target(self) -> tuple[int, int]:
        """The partial file's descriptor and the offset of this part's next byte."""
        if self.stop.is_set():
            raise Stopped()
        return self.job.fd, self.start + self.written

    def landed(self, n: int) -> None:
        """n bytes were put at target() by the source (hashed from the file once the hashed prefix reaches them)."""
        self._count(n)
        if self.stop.is_set():
            raise Stopped()

    def _count(self, n: int) -> None:
        self.written += n
        self.job.filled[self.i] = self.written
        self.progress.add(n)
