"""fetch(): URI → verified local path, through the weights cache (lookup → lock → re-lookup → transfer → commit)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import ChecksumMismatch, FetchError
from ..settings import Settings
from .cache import Entry, WeightsCache, content_key
from .http import HttpSource
from .objects import RemoteObject
from .s3 import S3Source
from .transfer import Transfer
from .uris import Location, check_sha256, parse_uri, safe_relpath
from .verify import fetch_hf, verify_local

log = logging.getLogger("sd_core.fetch")


def fetch(uri: str, settings: Settings, *, sha256: str | None = None, size: int | None = None,
          files: dict[str, str] | None = None, user_url: bool = False, variant: str | None = None,
          watch=None) -> Path:
    """Make `uri` available locally and return its local path.

    - An object URI (s3://b/k, https://..., hf://org/repo/file) -> a local FILE path in the cache.
    - A prefix URI ending in "/" (s3://b/prefix/, hf://org/repo) -> a local DIRECTORY in the cache holding every
      object under the prefix with the same relative paths. `files` optionally pins {relative_path: sha256}.
    - file:// and plain local paths -> returned as they are (no copy); sha256 still verified when given.
    Raises sd_core.errors.FetchError / ChecksumMismatch with a message naming the URI (never credentials).
    `user_url=True` (a URI from a request, already checked by sd_core.user_urls.check_user_url): http(s) downloads go
    through that policy (every redirect re-checked, pinned addresses) and every object is size-limited by
    SD_URL_MAX_BYTES. `variant` (a manifest's, e.g. fp16): a hub folder's weights are fetched in that variant only
    (other stores hold what the operator uploaded).
    """
    loc = parse_uri(uri)
    sha256 = check_sha256(sha256, "sha256")
    pins = {safe_relpath(rel, loc.display): check_sha256(v, f"files[{rel}]") for rel, v in (files or {}).items()}
    if loc.scheme == "file":
        return verify_local(Path(loc.path), loc.display, sha256, size, pins)
    if loc.scheme == "hf":
        return fetch_hf(loc, settings, sha256, size, pins, variant)
    source = S3Source(loc, settings) if loc.scheme == "s3" else HttpSource(loc, settings, user_url=user_url)
    cache = WeightsCache.from_settings(settings)
    if loc.is_prefix:
        if sha256:
            raise FetchError(f"{loc.display} is a folder: pin its files' checksums with `files`, not `sha256`",
                             field="sha256")
        return _fetch_prefix(source, cache, settings, loc, pins, watch)
    if pins:
        raise FetchError(f"{loc.display} is a single object: `files` pins belong to folder URIs ending in '/'",
                         field="files")
    return _fetch_object(source, cache, settings, loc, sha256, size, settings.url_max_bytes if user_url else None)


def _cached_fetch(cache: WeightsCache, key: str, label: str, *, revalidate: bool, probe: Callable[[], object],
                  unchanged: Callable[[Entry, object], bool], fill: Callable[[object, Path], dict]) -> Path:
    """The one cached-fetch shape. A complete entry for `key` is a hit (re-checked against `probe()`, the store's
    current state, when `revalidate`); otherwise, under the key's lock (another process may have just fetched it:
    look again), `fill(state, staging)` downloads into the staging folder and returns the meta to commit."""
    remote = None  # the store's current state (a stat or a listing), asked for at most once when it answers

    def still_good(entry: Entry) -> bool:
        nonlocal remote
        if not revalidate:
            return True
        if remote is None:
            try:
                remote = probe()
            except FetchError as exc:
                log.warning("cannot revalidate cached %s (%s); using the cached copy", label, exc)
                return True
        if unchanged(entry, remote):
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
        staging = cache.staging_dir(key)
        meta = fill(remote if remote is not None else probe(), staging)
        entry = cache.commit(key, staging, meta)
    _evict_after(cache, key)
    return entry.local_path


def _fetch_object(source, cache: WeightsCache, settings: Settings, loc: Location, sha256: str | None,
                  size: int | None, max_bytes: int | None = None) -> Path:
    label = loc.display
    key = content_key(sha256) if sha256 else source.object_key()

    def fill(obj: RemoteObject, staging: Path) -> dict:
        if max_bytes is not None and obj.size is not None and obj.size > max_bytes:
            raise FetchError(f"{label} is {obj.size} bytes, larger than the limit of {max_bytes} bytes "
                             "(SD_URL_MAX_BYTES)", field="uri")
        if size is not None and obj.size is not None and obj.size != size:
            raise ChecksumMismatch(f"size mismatch for {label}: the store has {obj.size} bytes, the manifest says "
                                   f"{size}", field="size")
        obj.sha256 = sha256
        _make_room(cache, key, obj.size)
        record = Transfer(source, staging, settings, label).run([obj])[obj.rel]
        return {"kind": "file", "uri": label, "name": obj.rel, "size": record["size"], "etag": obj.etag,
                "sha256": sha256, "keyed_by": "sha256" if sha256 else "uri"}

    return _cached_fetch(cache, key, label, revalidate=settings.cache_head_on_hit and not sha256,  # pinned: never stale
                         probe=source.stat, unchanged=lambda entry, obj: obj.matches(entry.meta), fill=fill)


def _fetch_prefix(source, cache: WeightsCache, settings: Settings, loc: Location, pins: dict[str, str],
                  watch=None) -> Path:
    label = loc.display

    def unchanged(entry: Entry, listing: list[RemoteObject]) -> bool:
        cached = entry.meta.get("files", {})
        return set(cached) == {o.rel for o in listing} and all(o.matches(cached[o.rel]) for o in listing)

    def fill(objects: list[RemoteObject], staging: Path) -> dict:
        if not objects:
            raise FetchError(f"no objects under {label}", field="uri")
        by_rel = {o.rel: o for o in objects}
        missing = sorted(set(pins) - set(by_rel))
        if missing:
            raise FetchError(f"pinned files missing under {label}: {', '.join(missing)}", field="files")
        for rel, digest in pins.items():
            by_rel[rel].sha256 = digest
        _make_room(cache, key, sum(o.size or 0 for o in objects))
        stale = {p for p in (staging / "data").rglob("*") if p.is_file()} if (staging / "data").exists() else set()
        if watch is not None:  # smallest first: the components that can load early land early, the UNet last
            objects = sorted(objects, key=lambda o: (o.size or 0, o.rel))
            watch.listing(staging / "data", [o.rel for o in objects])
        files = Transfer(source, staging, settings, label, on_file=watch.arrived if watch else None).run(objects)
        if watch is not None:
            watch.committing()  # waits for loads reading staging/data, then points the watcher elsewhere
        for leftover in stale - {staging / "data" / rel for rel in files}:  # objects deleted from the store since
            with contextlib.suppress(OSError):
                leftover.unlink()
        return {"kind": "dir", "uri": label, "size": sum(f["size"] for f in files.values()), "files": files,
                "keyed_by": "uri"}

    key = source.prefix_key(pins)
    return _cached_fetch(cache, key, label, revalidate=settings.cache_head_on_hit, probe=source.list,
                         unchanged=unchanged, fill=fill)


def _hit(cache: WeightsCache, entry: Entry, label: str) -> Path:
    cache.touch(entry)
    log.info("cache hit: %s -> %s", label, entry.local_path)
    return entry.local_path


def _make_room(cache: WeightsCache, key: str, nbytes: int | None) -> None:
    """Evict least recently used entries so that `nbytes` more fit in the budget (before downloading them)."""
    if cache.max_bytes is not None and nbytes:
        cache.evict(cache.max_bytes - nbytes, keep={key})


def _evict_after(cache: WeightsCache, key: str) -> None:
    if cache.max_bytes is None:
        return
    try:
        cache.evict(keep={key})
    except OSError as exc:  # eviction is housekeeping: never fail a successful fetch because of it
        log.warning("cache eviction failed: %s", exc)
