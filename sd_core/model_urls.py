"""A request's `model` given as a URL of one `.safetensors` checkpoint: policy, architecture from its header, cache.

The URL passes the user-URL policy (sd_core/user_urls.py), then its safetensors header alone is read (ranged reads:
the first bytes, never the whole file) and its tensor names say the architecture (``families.detect_architecture``),
their shapes the family's variant (``ModelFamily.variant``: FLUX.1 or FLUX.1 Fill).
The model becomes a synthetic single-file manifest named ``url-<sha16>`` (a hash of the URL without its signing
parameters: the URL itself never reaches logs or infotext) whose config folder and defaults are those of the catalog's
single-file model of that architecture (``config_uri``: no hub call). The file is fetched outside the GPU lock into the
weights cache under the policy (pinned addresses, redirects re-checked, ``SD_MAX_MODEL_URL_BYTES``); pickle is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import families, storage
from .checkpoints import PICKLE_SUFFIXES, checkpoint_shapes, is_readable_safetensors
from .errors import FetchError, InvalidRequest
from .manifests import LocalModel, ModelCatalog, ModelManifest, resolve_uri
from .settings import Settings
from .storage.uris import credential_params, stable_url
from .user_urls import USER_SCHEMES, CheckedURL, check_user_url, redact_url

log = logging.getLogger("sd_core.model_urls")

FIELD = "model"
PREFIX = "url-"
FIRST_READ = 1 << 20  # the first ranged read: the 8-byte length and, for most checkpoints, the whole header
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header
REMEMBERED = 64  # URLs whose detected manifest is kept (a repeated URL costs no probe)


def is_model_url(value: str | None) -> bool:
    """Whether a request's `model` is a URL rather than a manifest name."""
    return isinstance(value, str) and "://" in value


def url_key(url: str) -> str:
    """What tells model URLs apart: the URL without its signing parameters, plus a hash of those (tokens, signatures),
    so a model fetched with one credential is never handed to a request with another or none."""
    secret = credential_params(url)
    return stable_url(url) + ("\0" + hashlib.sha256(secret.encode()).hexdigest() if secret else "")


def url_label(url: str) -> str:
    """The short stable name of a model URL: ``url-`` + 16 hex digits of its hash (signing parameters hashed apart)."""
    return PREFIX + hashlib.sha256(url_key(url).encode()).hexdigest()[:16]  # 64 bits: no name collision to craft


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, field=FIELD)


def _failed(shown: str, exc: FetchError | InvalidRequest) -> InvalidRequest:
    """A fetch or policy failure of the URL the caller gave: theirs to fix, naming the model URL's own size limit."""
    return _refuse(f"{shown}: {exc.message}".replace("(SD_URL_MAX_BYTES)", "(SD_MAX_MODEL_URL_BYTES)"))


class ModelUrls:
    """Resolves model URLs into synthetic manifests (remembered per URL) and fetches their files."""

    def __init__(self, catalog: ModelCatalog, settings: Settings):
        self.catalog = catalog
        self.settings = settings
        # the user-URL limits with the model's own size limit (a checkpoint is larger than any other user download)
        self.fetch_settings = replace(settings, url_max_bytes=settings.max_model_url_bytes)
        self._manifests: OrderedDict[str, ModelManifest] = OrderedDict()  # stable URL -> manifest
        self._by_name: dict[str, ModelManifest] = {}
        self._lock = threading.Lock()

    def owns(self, name: str) -> bool:
        return name in self._by_name

    def manifest(self, name: str) -> ModelManifest:
        return self._by_name[name]

    # --- stage 1: the manifest ---------------------------------------------------------------------------------------
    def resolve(self, url: str) -> ModelManifest:
        """The synthetic manifest of a model URL (policy checked, header read once per URL)."""
        if not self.settings.allow_model_urls:
            raise _refuse("model URLs are turned off on this worker (SD_ALLOW_MODEL_URLS=0); give a model name")
        checked = check_user_url(url, field=FIELD, settings=self.fetch_settings, schemes=USER_SCHEMES)
        shown = checked.redacted
        suffix = Path(unquote(urlsplit(url).path)).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise _refuse(f"{shown}: pickle checkpoints ({', '.join(sorted(PICKLE_SUFFIXES))}) can execute code when "
                          "loaded and are refused for model URLs; give the URL of a .safetensors file")
        key = url_key(url)
        with self._lock:
            known = self._manifests.get(key)
            if known is not None:
                self._manifests.move_to_end(key)
                return known
        architecture = self._detect(read_header_shapes(checked, self.fetch_settings), shown)
        donor = self._donor(architecture, shown)
        manifest = ModelManifest(
            name=url_label(url), description="model from a URL", architecture=architecture, format="single_file",
            uri=url, config_uri=resolve_uri(donor.config_uri, self.settings), config_files=donor.config_files,
            defaults=donor.defaults.model_copy(),
        )
        log.info("model URL %s is %s (%s; config of %s)", manifest.name, shown, architecture, donor.name)
        with self._lock:
            self._manifests[key] = manifest
            self._by_name[manifest.name] = manifest
            while len(self._manifests) > REMEMBERED:
                _, dropped = self._manifests.popitem(last=False)
                self._by_name.pop(dropped.name, None)
        return manifest

    def _detect(self, shapes: dict[str, list[int]], shown: str) -> str:
        """The architecture from the tensor names, then the family's variant from their shapes (FLUX.1 Fill)."""
        architecture = families.detect_architecture(shapes)
        if architecture is None:
            raise _refuse(f"{shown} is not a Stable Diffusion checkpoint this worker can load (its tensor names match "
                          f"none of {', '.join(families.NAMES)}; a LoRA, VAE or embedding file is not a model)")
        try:
            return families.family(architecture).variant(shapes)
        except ValueError as exc:
            raise _refuse(f"{shown}: {exc}") from None

    def _donor(self, architecture: str, shown: str) -> ModelManifest:
        """The catalog's single-file model of ``architecture``: its config folder and defaults serve URL models."""
        for manifest in self.catalog.manifests.values():
            if manifest.architecture == architecture and manifest.format == "single_file" and manifest.config_uri:
                return manifest
        raise _refuse(f"{shown} is an {architecture} checkpoint, but this worker's catalog has no single-file "
                      f"{architecture} model whose config folder it could use")

    # --- stage 4: the file -------------------------------------------------------------------------------------------
    def fetch(self, manifest: ModelManifest) -> LocalModel:
        """Fetch (or find in the cache) a URL model's file under the user-URL policy, and its config folder."""
        shown = redact_url(manifest.uri)
        try:
            path = Path(storage.fetch(manifest.uri, self.fetch_settings, user_url=True))
            config = storage.fetch(manifest.config_uri, self.settings, files=manifest.config_files or None)
        except (FetchError, InvalidRequest) as exc:  # the caller gave a URL we cannot get: theirs to fix
            raise _failed(shown, exc) from None
        if not is_readable_safetensors(path):
            raise _refuse(f"{shown}: not a valid .safetensors file (a pickle under that name, or damaged); refused")
        try:  # the file changed since the probe?
            architecture = self._detect(checkpoint_shapes(path), shown)
        except InvalidRequest:
            architecture = None
        if architecture != manifest.architecture:
            raise _refuse(f"{shown}: the downloaded file is not the {manifest.architecture} checkpoint its header "
                          "said; refused")
        return LocalModel(manifest=manifest, weights=_safetensors_name(path, manifest, self.settings), config=config)


def _safetensors_name(path: Path, manifest: ModelManifest, settings: Settings) -> Path:
    """The cached file under a `.safetensors` name (diffusers picks its loader by the suffix; anything else would be
    unpickled): the file itself, or a link to it when its URL ended otherwise (a download API's URL)."""
    if path.suffix.lower() == ".safetensors":
        return path
    link = Path(settings.cache_dir) / "model-urls" / f"{manifest.name}.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.{threading.get_ident()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(path)
    temporary.replace(link)
    return link


# --- the header probe ------------------------------------------------------------------------------------------------
def read_header_shapes(checked: CheckedURL, settings: Settings) -> dict[str, list[int]]:
    """The tensor names in a remote .safetensors file's header, with their shapes, read with ranged requests (a server
    that ignores Range is read only as far as the header, then the connection is closed)."""
    shown = checked.redacted
    head = _read(checked, settings, 0, FIRST_READ)
    if len(head) < 8:
        raise _refuse(f"{shown} is not a .safetensors checkpoint (shorter than a safetensors header)")
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= MAX_HEADER:
        raise _refuse(f"{shown} is not a .safetensors checkpoint (no safetensors header)")
    header = head[8:8 + length]
    if len(header) < length:
        header += _read(checked, settings, 8 + len(header), length - len(header))
    try:
        parsed = json.loads(header)
        if not isinstance(parsed, dict) or len(header) != length:
            raise ValueError
    except ValueError:
        raise _refuse(f"{shown} is not a .safetensors checkpoint (its header does not parse)") from None
    return {key: value.get("shape") if isinstance(value, dict) else None
            for key, value in parsed.items() if key != "__metadata__"}


def _read(checked: CheckedURL, settings: Settings, start: int, count: int) -> bytes:
    """Up to ``count`` bytes of the object from ``start``."""
    try:
        if checked.scheme == "s3":
            return _read_s3(checked, settings, start, count)
        return _read_http(checked, settings, start, count)
    except (FetchError, InvalidRequest) as exc:
        raise _failed(checked.redacted, exc) from None


def _read_http(checked: CheckedURL, settings: Settings, start: int, count: int) -> bytes:
    import requests

    from .user_downloads import open_user_url

    try:
        with open_user_url(checked.url, field=FIELD, settings=settings, schemes=USER_SCHEMES,
                           headers={"Range": f"bytes={start}-{start + count - 1}"}) as response:
            if response.status_code not in (200, 206):
                raise _refuse(f"{checked.redacted}: HTTP {response.status_code}")
            skip = start if response.status_code == 200 else 0  # Range ignored: the body starts at byte 0
            data = bytearray()
            for chunk in response.iter_content():
                data += chunk
                if len(data) >= skip + count:
                    break
            return bytes(data[skip:skip + count])
    except requests.RequestException as exc:
        raise _refuse(f"{checked.redacted}: {exc}") from None


def _read_s3(checked: CheckedURL, settings: Settings, start: int, count: int) -> bytes:
    from .storage.objects import RemoteObject, Transient
    from .storage.s3 import S3Source
    from .storage.uris import parse_uri

    source = S3Source(parse_uri(checked.url), settings)
    size = source.stat().size or 0
    if size > settings.url_max_bytes:
        raise _refuse(f"{checked.redacted} is {size} bytes, larger than the limit of {settings.url_max_bytes} bytes "
                      "(SD_MAX_MODEL_URL_BYTES)")
    end = min(start + count, size) - 1
    if end < start:
        return b""
    data = bytearray()
    try:
        source.read_range(RemoteObject("header", source.loc.path, size, None), start, end, data.extend)
    except Transient as exc:
        raise _refuse(f"{checked.redacted}: cannot read its header ({exc})") from None
    return bytes(data)

