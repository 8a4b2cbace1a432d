"""Read-only Hugging Face hub caches (RunPod's cached models, HF_HUB_CACHE): hf:// weights found there, no hub call."""

from __future__ import annotations

import logging
from pathlib import Path

from ..settings import Settings
from .uris import Location, safe_relpath

log = logging.getLogger("sd_core.fetch")


def model_cache_roots(settings: Settings) -> list[Path]:
    """The read-only hub caches to look in, in order: SD_HF_MODEL_CACHE (RunPod's), then HF_HUB_CACHE; existing only."""
    roots = [settings.hf_model_cache, settings.hf_hub_cache]
    seen: list[Path] = []
    for root in roots:
        if root is not None and Path(root).is_dir() and Path(root) not in seen:
            seen.append(Path(root))
    return seen


def find_cached(loc: Location, settings: Settings) -> Path | None:
    """The local path of hf://org/repo[@rev][/path] in a read-only hub cache (the snapshot folder, a folder in it,
    or a file in it), or None when no cache holds it. A branch or tag revision resolves through ``refs/<name>``;
    nothing is downloaded, the hub is never asked and nothing is written (huggingface_hub's local-only lookups)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    sub = loc.path.rstrip("/")
    if sub:
        safe_relpath(sub, loc.display)  # never a path out of the snapshot
    if loc.revision and loc.revision.strip(".") == "":
        return None  # "." / "..": no branch, and no path into refs/ may leave it
    for root in model_cache_roots(settings):
        try:
            if loc.is_prefix:
                snapshot = Path(snapshot_download(repo_id=loc.host, revision=loc.revision, cache_dir=root,
                                                  local_files_only=True,
                                                  allow_patterns=[f"{sub}/*"] if sub else None))
                path = snapshot / sub if sub else snapshot
                if not path.is_dir() or not any(path.iterdir()):
                    continue
            else:
                path = Path(hf_hub_download(repo_id=loc.host, filename=loc.path, revision=loc.revision,
                                            cache_dir=root, local_files_only=True))
                if not path.is_file():  # a dangling link: the blob is not there
                    continue
        except Exception as exc:  # not cached there (LocalEntryNotFoundError, an incomplete snapshot, a bad name)
            log.debug("%s is not in the hub cache %s (%s)", loc.display, root, type(exc).__name__)
            continue
        log.info("%s found in the local model cache %s: no download", loc.display, root)
        return path
    return None
