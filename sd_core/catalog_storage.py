"""The model catalog read from storage: SD_MODELS_DIR as an s3:// or https:// prefix, copied locally at cold start.

- ``s3://bucket/prefix/``: every ``*.yaml`` / ``*.yml`` object directly under the prefix (listed; not sub-folders).
- ``https://host/prefix/``: the prefix's ``models.txt`` names the manifest files, one per line (``#`` comments and
  blank lines ignored), each fetched from the same prefix; a web server cannot be listed.

The files (``_safety_checker.yaml`` and ``_upscalers.yaml`` included) land in a fresh local folder of this process,
which then stands for SD_MODELS_DIR, so an operator adds a model by uploading a manifest (read at the next cold
start). Relative URIs inside the manifests are joined onto SD_WEIGHTS_URI as usual. These are operator URIs: they
are fetched with the storage layer (worker credentials), not under the user-URL policy.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

from .errors import FetchError, ManifestError
from .settings import Settings
from .storage.objects import RemoteObject, Transient, backoff
from .storage.uris import parse_uri, redact

log = logging.getLogger("sd_core.catalog")

INDEX = "models.txt"
SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 1024 * 1024  # a manifest, or the index: small text files
MAX_FILES = 1000


def is_remote(models_dir) -> bool:
    """Whether SD_MODELS_DIR names a storage prefix rather than a local folder."""
    return isinstance(models_dir, str) and "://" in models_dir


def with_local_catalog(settings: Settings) -> Settings:
    """``settings`` with a remote SD_MODELS_DIR replaced by a local copy of its manifests (local ones stay)."""
    if not is_remote(settings.models_dir):
        return settings
    return replace(settings, models_dir=snapshot(str(settings.models_dir), settings))


def snapshot(uri: str, settings: Settings) -> Path:
    """Copy the manifests under a storage prefix into a new local folder; ManifestError naming the prefix if not."""
    prefix = uri if uri.endswith("/") else uri + "/"
    shown = redact(prefix)
    started = time.perf_counter()
    try:
        loc = parse_uri(prefix)
        if loc.scheme == "s3":
            files = _from_s3(loc, settings)
        elif loc.scheme in ("http", "https"):
            files = _from_web(prefix, settings)
        else:
            raise ManifestError(f"SD_MODELS_DIR {shown}: a local folder, an s3:// or an https:// prefix")
    except FetchError as exc:
        raise ManifestError(f"cannot read the model catalog at {shown}: {exc.message}") from None
    if not files:
        raise ManifestError(f"no manifests (*.yaml) under {shown}")
    folder = Path(tempfile.mkdtemp(prefix="sd-catalog-"))
    for name, body in files.items():
        (folder / name).write_bytes(body)
    log.info("catalog: %d manifest files from %s in %.2fs", len(files), shown, time.perf_counter() - started)
    return folder


def _manifest_name(name: str, where: str) -> str:
    """A manifest file name from a listing or an index: a plain ``*.yaml`` name, nothing that could leave a folder."""
    if "/" in name or "\\" in name or name.startswith(".") or PurePosixPath(name).name != name:
        raise ManifestError(f"catalog {where}: {name[:100]!r} is not a plain manifest file name")
    if not name.lower().endswith(SUFFIXES):
        raise ManifestError(f"catalog {where}: {name[:100]!r} is not a manifest (*.yaml)")
    return name


def _read(source, obj: RemoteObject, settings: Settings) -> bytes:
    """One small object, whole, retried like any fetch."""
    data = bytearray()

    def sink(chunk: bytes) -> None:
        data.extend(chunk)
        if len(data) > MAX_FILE_BYTES:
            raise ManifestError(f"catalog file {redact(obj.ref)} is larger than {MAX_FILE_BYTES} bytes")

    for attempt in range(settings.fetch_retries + 1):
        data.clear()
        try:
            source.read_range(obj, 0, None, sink)
            return bytes(data)
        except Transient as exc:
            if attempt == settings.fetch_retries:
                raise FetchError(f"cannot read {redact(obj.ref)}: {exc}", field="uri") from None
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


def _from_s3(loc, settings: Settings) -> dict[str, bytes]:
    from .storage.s3 import S3Source

    source = S3Source(loc, settings)
    listed = [obj for obj in source.list() if "/" not in obj.rel and obj.rel.lower().endswith(SUFFIXES)]
    if len(listed) > MAX_FILES:
        raise ManifestError(f"more than {MAX_FILES} manifests under {loc.display}")
    return {_manifest_name(obj.rel, loc.display): _read(source, obj, settings) for obj in listed}


def _from_web(prefix: str, settings: Settings) -> dict[str, bytes]:
    from .storage.http import HttpSource

    def get(url: str) -> bytes:
        loc = parse_uri(url)
        return _read(HttpSource(loc, settings), RemoteObject(loc.name, url, None, None, ranges=False), settings)

    where = redact(prefix + INDEX)
    lines = [line.split("#", 1)[0].strip() for line in get(prefix + INDEX).decode("utf-8", "replace").splitlines()]
    names = list(dict.fromkeys(_manifest_name(line, where) for line in lines if line))
    if len(names) > MAX_FILES:
        raise ManifestError(f"more than {MAX_FILES} manifests in {where}")
    return {name: get(prefix + name) for name in names}
