"""Verification of local bytes: sha256 of files (memoised), local paths and folders, hf:// via huggingface_hub."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from ..errors import ChecksumMismatch, FetchError
from ..settings import Settings
from .uris import Location, safe_relpath

log = logging.getLogger("sd_core.fetch")

_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_SHA_MEMO_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a local file; remembered per (path, size, mtime) within the process."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_MEMO_LOCK:
        if memo_key in _SHA_MEMO:
            return _SHA_MEMO[memo_key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _SHA_MEMO_LOCK:
        _SHA_MEMO[memo_key] = digest
    return digest


def verify_local(path: Path, display: str, sha256: str | None, size: int | None,
                  files: dict[str, str] | None) -> Path:
    """`path` itself once its size, sha256 and pinned files check out; FetchError / ChecksumMismatch otherwise."""
    if not path.exists():
        raise FetchError(f"not found: {display}", field="uri")
    if path.is_file():
        if size is not None and path.stat().st_size != size:
            raise ChecksumMismatch(f"size mismatch for {display}: {path.stat().st_size} bytes, the manifest says "
                                   f"{size}", field="size")
        if sha256 and (digest := file_sha256(path)) != sha256:
            raise ChecksumMismatch(f"sha256 mismatch for {display}: expected {sha256}, got {digest}", field="sha256")
    elif sha256:
        raise FetchError(f"{display} is a folder: pin its files' checksums with `files`, not `sha256`",
                         field="sha256")
    for rel, expected in (files or {}).items():
        member = path / safe_relpath(rel, display)
        if not member.is_file():
            raise FetchError(f"pinned file {rel!r} is missing under {display}", field="files")
        if (digest := file_sha256(member)) != expected:
            raise ChecksumMismatch(f"sha256 mismatch for {display.rstrip('/')}/{rel}: expected {expected}, got "
                                   f"{digest}", field="files")
    return path


# What a diffusers folder is loaded from: configs, tokenizer files, safetensors weights. Pickle weights only with
# SD_ALLOW_PICKLE; Flax, ONNX and OpenVINO exports never (SDXL base ships all three beside its safetensors). Variant
# files (`*.fp16.safetensors`) only for a manifest with that `variant`, and then instead of the plain weights (the
# loader asks for the variant's files: ModelManifest.variant).
HF_CONFIG_FILES = ("*.json", "*.txt", "*.model")
HF_WEIGHT_FILES = ("*.safetensors",)
HF_PICKLE_FILES = ("*.bin", "*.ckpt", "*.pt", "*.pth")
# variants never loaded unless the manifest names one: single files (model.fp16.safetensors) and shards
# (model.fp16-00001-of-00002.safetensors, as SD3.5's text_encoder_3)
HF_NEVER = ("*.msgpack", "*.onnx", "*.onnx_data", "*openvino*", "*.h5", "*.ot", "*.fp16.*", "*.bf16.*", "*.fp16-*",
            "*.bf16-*", "*.non_ema.*", "*.ema.*", ".gitattributes", "README*")


def hf_folder_patterns(sub: str, settings: Settings, components: list[str] | None = None,
                       variant: str | None = None) -> tuple[list[str], list[str]]:
    """``snapshot_download``'s allow and ignore patterns for the folder ``sub`` of a hub repo ("" = the whole repo).
    ``components``: a diffusers pipeline's component folders (its model_index.json): only those and model_index.json
    are fetched (not the single-file checkpoint or extra VAE folders a repo also ships at its top). ``variant``
    (``fp16``): that variant's weight files (single or sharded) instead of the plain ones."""
    weights = HF_WEIGHT_FILES + (HF_PICKLE_FILES if settings.allow_pickle else ())
    if variant:
        weights = tuple(w for pattern in weights for w in (pattern.replace("*.", f"*.{variant}.", 1),
                                                            pattern.replace("*.", f"*.{variant}-*.", 1)))
    allowed = HF_CONFIG_FILES + weights
    never = tuple(p for p in HF_NEVER if not variant or p not in (f"*.{variant}.*", f"*.{variant}-*"))
    base = f"{sub}/" if sub else ""
    if components is not None:
        folders = [f"{base}{name}/" for name in components]
        allow = [f"{base}model_index.json"] + [folder + pattern for folder in folders for pattern in allowed]
    else:
        allow = [base + pattern for pattern in allowed]
    return allow, [base + pattern for pattern in never]


def pipeline_components(model_index: Path) -> list[str]:
    """The component folders a diffusers model_index.json names (``"unet": ["diffusers", "UNet2DConditionModel"]``)."""
    import json

    data = json.loads(model_index.read_text())
    return sorted(name for name, value in data.items() if not name.startswith("_") and isinstance(value, list)
                  and len(value) == 2 and value[0] is not None and safe_relpath(name, str(model_index)) == name)


def _hf_components(loc: Location, sub: str, cache_dir: Path) -> list[str] | None:
    """The pipeline components of a hub folder that has a model_index.json (fetched first, alone), else None."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(repo_id=loc.host, filename=f"{sub}/model_index.json" if sub else "model_index.json",
                                revision=loc.revision, cache_dir=cache_dir)
    except hf_errors.LocalEntryNotFoundError:  # offline / unreachable (a subclass of the next): not an answer
        raise
    except hf_errors.EntryNotFoundError:
        return None
    try:
        return pipeline_components(Path(index))
    except (ValueError, FetchError):
        raise FetchError(f"{loc.display}: model_index.json cannot be read", field="uri") from None


def fetch_hf(loc: Location, settings: Settings, sha256: str | None, size: int | None,
              files: dict[str, str] | None, variant: str | None = None) -> Path:
    """hf://org/repo[@rev][/path] from a read-only hub cache that holds it (RunPod's cached models: hf_cache), else
    through huggingface_hub into its own cache under SD_CACHE_DIR/hf (token: HF_TOKEN)."""
    from .hf_cache import find_cached

    cached = find_cached(loc, settings)
    if cached is not None:
        return verify_local(cached, loc.display, sha256, size, files)
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime requirement
        raise FetchError(f"huggingface_hub is not installed: cannot fetch {loc.display}", field="uri") from None
    cache_dir = Path(settings.cache_dir) / "hf"
    t0 = time.monotonic()
    try:
        if loc.is_prefix:
            sub = loc.path.rstrip("/")
            allow, ignore = hf_folder_patterns(sub, settings, _hf_components(loc, sub, cache_dir), variant)
            root = snapshot_download(repo_id=loc.host, revision=loc.revision, cache_dir=cache_dir,
                                     allow_patterns=allow, ignore_patterns=ignore,
                                     max_workers=settings.fetch_concurrency)
            path = Path(root) / sub if sub else Path(root)
        else:
            path = Path(hf_hub_download(repo_id=loc.host, filename=loc.path, revision=loc.revision,
                                        cache_dir=cache_dir))
    except hf_errors.GatedRepoError:
        raise FetchError(f"{loc.display}: gated repository; accept its terms and set HF_TOKEN", field="uri") from None
    except hf_errors.RepositoryNotFoundError:
        raise FetchError(f"repository not found or not accessible: {loc.display} (set HF_TOKEN for private repos)",
                         field="uri") from None
    except hf_errors.RevisionNotFoundError:
        raise FetchError(f"revision not found: {loc.display}", field="uri") from None
    except hf_errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
        raise FetchError(f"cannot fetch {loc.display}: the hub is unreachable (or HF_HUB_OFFLINE is set) and it is "
                         "not in the local hub cache", field="uri") from None
    except hf_errors.EntryNotFoundError:
        raise FetchError(f"object not found: {loc.display}", field="uri") from None
    except Exception as exc:
        raise FetchError(f"cannot fetch {loc.display}: {type(exc).__name__}", field="uri") from None
    log.info("fetched %s via huggingface_hub in %.2fs -> %s", loc.display, time.monotonic() - t0, path)
    return verify_local(path, loc.display, sha256, size, files)
