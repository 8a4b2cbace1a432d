"""The weights cache: content-addressed entries on local disk or a network volume, file-locked, atomic, LRU-evicted.

Layout under ``<SD_CACHE_DIR>/v1/``::

    entries/<key[:2]>/<key>/meta.json   what the entry holds (uri, kind, size, files, etags, sha256s); its mtime
                                        is the entry's last use (LRU)
    entries/<key[:2]>/<key>/data/...    the object (data/<name>) or the folder tree (data/<relative path>)
    staging/<key>/                      a download in progress, or an interrupted one that the next fetch resumes
                                        (partial/<h> + its parts record partial/<h>.json)
    locks/<key>.lock                    one filelock per key: downloading, committing and evicting take it
    trash/                              entries being deleted

Keys are hex sha256 digests:

- an object whose sha256 the manifest pins is keyed by that sha256 itself (content addressing: the same bytes under
  two URIs share one entry, and a hit needs no network at all);
- anything else is keyed by a digest of its normalised URI (plus the S3 endpoint override and the pinned per-file
  checksums of a folder); the store's ETag and size are recorded in meta.json, and ``SD_CACHE_HEAD_ON_HIT=1``
  re-checks them with one HEAD (or LIST for a folder) per hit.

An entry only ever appears under ``entries/`` complete: the download is assembled under ``staging/<key>/`` and then
renamed into place in one step, with meta.json written before the rename. Entries are immutable afterwards.
The cache never lives inside the read-only Hugging Face model cache (``SD_HF_MODEL_CACHE``, RunPod's cached models,
read by ``hf_cache``): its default folder is on a RunPod *network volume* only (``settings.runpod_network_volume``).
The first time a process opens a cache (``from_settings``) it deletes what no fetch can resume from staging/ folders
nobody holds locked: partial files without a parts record, parts records without a partial file, temp files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import FetchError
from ..settings import Settings

log = logging.getLogger("sd_core.fetch")

GB = 1_000_000_000  # SD_CACHE_MAX_GB counts decimal gigabytes
LOCK_WAIT_S = 2 * 3600  # give up waiting for another process's download after this long
LOCK_LOG_EVERY_S = 30.0


def content_key(sha256: str) -> str:
    """Key of an entry that holds exactly the bytes with this sha256."""
    return sha256.lower()


def uri_key(*parts: str) -> str:
    """Key of an entry named by where it comes from (URI, endpoint, pins), not by its bytes."""
    return hashlib.sha256("\0".join(("uri",) + parts).encode()).hexdigest()


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _is_parts_record(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("done"), list)
    except (OSError, ValueError, AttributeError):
        return False


_SWEPT: set[Path] = set()  # cache roots this process has already swept
_SWEPT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Entry:
    """One complete cache entry."""

    key: str
    path: Path
    meta: dict

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "file")

    @property
    def size(self) -> int:
        return int(self.meta.get("size") or 0)

    @property
    def local_path(self) -> Path:
        """The file for an object entry, the folder for a prefix entry."""
        data = self.path / "data"
        return data / self.meta["name"] if self.kind == "file" else data

    @property
    def last_used(self) -> float:
        try:
            return (self.path / "meta.json").stat().st_mtime
        except OSError:
            return 0.0


class WeightsCache:
    """A cache directory shared safely by threads, processes and machines (through a network volume)."""

    def __init__(self, root: Path | str, max_bytes: int | None = None):
        self.base = Path(root).expanduser()
        self.root = self.base / "v1"
        self.max_bytes = max_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> WeightsCache:
        """The configured cache; the first open in this process sweeps unresumable leftovers from staging/.
        Refused inside the read-only model cache (SD_HF_MODEL_CACHE, RunPod's cached models): never filled or
        evicted."""
        cache = cls(settings.cache_dir, int(settings.cache_max_gb * GB))
        model_cache = Path(settings.hf_model_cache).expanduser().resolve()
        if cache.base.resolve().is_relative_to(model_cache):
            raise FetchError(f"the weights cache {cache.base} is inside the read-only model cache {model_cache} "
                             "(SD_HF_MODEL_CACHE); set SD_CACHE_DIR to another folder", field="SD_CACHE_DIR")
        with _SWEPT_LOCK:
            first = cache.root not in _SWEPT
            _SWEPT.add(cache.root)
        if first:
            cache.sweep_staging()
        return cache

    # --- paths ---
    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / key

    def staging_dir(self, key: str) -> Path:
        return self.root / "staging" / key

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def _mkdirs(self) -> None:
        try:
            for sub in ("entries", "staging", "locks", "trash"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FetchError(f"cannot create the weights cache in {self.base} ({exc.strerror}); "
                             "set SD_CACHE_DIR to a writable folder", field="SD_CACHE_DIR") from None

    # --- reading ---
    def lookup(self, key: str) -> Entry | None:
        """The complete entry for `key`, or None. Never sees a partial download (those live under staging/)."""
        path = self.entry_dir(key)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cache entry %s is unreadable (%s); it will be fetched again", path, exc)
            return None
        entry = Entry(key, path, meta)
        if not entry.local_path.exists():
            log.warning("cache entry %s lost its data; it will be fetched again", path)
            return None
        return entry

    def touch(self, entry: Entry) -> None:
        """Mark an entry used now (LRU order). A read-only cache volume just keeps the old order."""
        with contextlib.suppress(OSError):
            os.utime(entry.path / "meta.json")

    def entries(self) -> list[Entry]:
        """Every complete entry, least recently used first."""
        found = []
        for meta_path in self.root.glob("entries/*/*/meta.json"):
            entry = self.lookup(meta_path.parent.name)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.last_used)

    def usage(self) -> int:
        """Bytes held by complete entries and interrupted downloads."""
        return sum(e.size for e in self.entries()) + sum(size for _, size, _ in self._staging_dirs())

    # --- writing ---
    @contextlib.contextmanager
    def lock(self, key: str, label: str) -> Iterator[None]:
        """Hold `key`'s file lock: one downloader per key across processes; waits (logging) for the holder."""
        self._mkdirs()
        lock = FileLock(self._lock_path(key))
        waited = 0.0
        while True:
            try:
                lock.acquire(timeout=LOCK_LOG_EVERY_S if waited else 0.2)
                break
            except Timeout:
                if not waited:
                    log.info("waiting for another process that is fetching %s", label)
                    waited = 0.2
                    continue
                waited += LOCK_LOG_EVERY_S
                if waited >= LOCK_WAIT_S:
                    raise FetchError(f"gave up after {waited:.0f}s waiting for another process fetching {label}",
                                     field="uri") from None
                log.info("still waiting (%.0fs) for another process fetching %s", waited, label)
        try:
            yield
        finally:
            lock.release()

    def commit(self, key: str, staging: Path, meta: dict) -> Entry:
        """Publish a finished staging folder as the entry `key` in one rename. The caller holds the key's lock."""
        meta = dict(meta, key=key, committed=time.time())
        for leftover in ("partial", "journal.json"):
            p = staging / leftover
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        write_json_atomic(staging / "meta.json", meta)
        target = self.entry_dir(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a stale entry (the object changed in the store): replace it
            self._trash(target)
        os.rename(staging, target)
        entry = self.lookup(key)
        if entry is None:
            raise FetchError(f"the cache entry for {meta.get('uri') or key[:12]} vanished right after it was written",
                             field="SD_CACHE_DIR")
        return entry

    def remove(self, key: str) -> None:
        """Delete an entry. The caller holds the key's lock."""
        target = self.entry_dir(key)
        if target.exists():
            self._trash(target)

    def _trash(self, path: Path) -> None:
        (self.root / "trash").mkdir(parents=True, exist_ok=True)
        dest = self.root / "trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return
        shutil.rmtree(dest, ignore_errors=True)

    def sweep_staging(self) -> int:
        """Delete what no fetch can resume from staging/ folders no process holds locked (housekeeping: never
        raises). A partial file is resumable only with its parts record; a folder left empty goes. Returns the count
        of files deleted."""
        deleted = 0
        for staging in list(self.root.glob("staging/*")):
            lock = FileLock(self._lock_path(staging.name))
            try:
                self._lock_path(staging.name).parent.mkdir(parents=True, exist_ok=True)
                lock.acquire(timeout=0)
            except (Timeout, OSError):
                continue  # being fetched right now (or a read-only volume)
            try:
                deleted += self._sweep_one(staging)
            except OSError as exc:
                log.warning("cache: cannot clean the interrupted download %s: %s", staging.name[:12], exc.strerror)
            finally:
                lock.release()
        if deleted:
            log.info("cache: deleted %d unresumable leftover file(s) of interrupted downloads", deleted)
        return deleted

    @staticmethod
    def _sweep_one(staging: Path) -> int:
        doomed = [p for p in staging.rglob("*.tmp") if p.is_file()]
        partial = staging / "partial"
        if partial.is_dir():
            for p in partial.iterdir():
                if p.suffix == ".json":
                    if not p.with_suffix("").exists():
                        doomed.append(p)
                elif not p.name.endswith(".tmp") and not _is_parts_record(p.with_name(p.name + ".json")):
                    doomed += [p, p.with_name(p.name + ".json")]
        deleted = 0
        for p in doomed:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                deleted += 1
        if not any(p.is_file() for p in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)
        return deleted

    # --- eviction ---
    def _staging_dirs(self) -> Iterable[tuple[Path, int, float]]:
        for path in self.root.glob("staging/*"):
            size, mtime = 0, 0.0
            for p in [path, *path.rglob("*")]:
                with contextlib.suppress(OSError):
                    st = p.stat()
                    mtime = max(mtime, st.st_mtime)
                    if p.is_file():
                        size += st.st_size
            yield path, size, mtime

    def evict(self, target_bytes: int | None = None, keep: Iterable[str] = ()) -> list[str]:
        """Delete least recently used entries (and stale interrupted downloads) until usage <= target_bytes.

        `target_bytes` defaults to the cache budget. Entries in `keep` and entries another process holds locked
        (being fetched or committed) are skipped. Returns the evicted keys.
        """
        target = self.max_bytes if target_bytes is None else target_bytes
        if target is None or not self.root.exists():
            return []
        for leftover in self.root.glob("trash/*"):  # deletions a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        keep = set(keep)
        candidates: list[tuple[float, str, int, Path, bool]] = []
        for entry in self.entries():
            candidates.append((entry.last_used, entry.key, entry.size, entry.path, True))
        for path, size, mtime in self._staging_dirs():
            candidates.append((mtime, path.name, size, path, False))
        total = sum(c[2] for c in candidates)
        if total <= target:
            return []
        evicted = []
        for _, key, size, path, is_entry in sorted(candidates, key=lambda c: c[0]):
            if total <= target:
                break
            if key in keep:
                continue
            lock = FileLock(self._lock_path(key))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # in use by a fetch right now
            try:
                if path.exists():
                    self._trash(path)
                    total -= size
                    evicted.append(key)
                    log.info("cache: evicted %s (%.1f MB, %s) to stay within %.2f GB", key[:12], size / 1e6,
                             "entry" if is_entry else "interrupted download", target / GB)
            finally:
                lock.release()
        if total > target:
            log.warning("cache: %.2f GB in use exceeds the %.2f GB budget (the rest is in use or just fetched)",
                        total / GB, target / GB)
        return evicted
