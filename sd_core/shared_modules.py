"""Components two loaded models share instead of holding twice: the SDXL refiner's VAE and bigG are the base's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .manifests import LocalModel
from .storage.verify import file_sha256

log = logging.getLogger("sd_core.shared_modules")

SHAREABLE = ("vae", "text_encoder", "text_encoder_2")  # never the UNet: a refiner's is its own
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def shared_components(local: LocalModel, other) -> dict[str, object]:
    """Modules of the loaded model ``other`` (a pipelines.LoadedModel, or None) that ``local``, a diffusers folder
    about to be loaded, may take instead of loading its own: the components whose config (its ``_``-keys aside) and
    weight files (sha256: pinned in the manifests, else hashed once) are the same in both folders."""
    if other is None or local.manifest.format != "diffusers" or other.local.manifest.format != "diffusers":
        return {}  # single files: components are not separate files to compare
    index = json.loads((local.weights / "model_index.json").read_text())
    loaded = other.pipes["txt2img"].components
    shared = {}
    for name in SHAREABLE:
        if loaded.get(name) is None or not (isinstance(index.get(name), list) and index[name][0]):
            continue
        mine = _fingerprint(local.weights / name, local.manifest.files, name)
        if mine is not None and mine == _fingerprint(other.local.weights / name, other.local.manifest.files, name):
            shared[name] = loaded[name]
    if shared:
        log.info("%s shares %s with %s", local.manifest.name, ", ".join(shared), other.name)
    return shared


def _fingerprint(folder: Path, pinned: dict[str, str], component: str) -> tuple | None:
    """(config without diffusers' bookkeeping keys, ((weight file, sha256), ...)) of one component folder."""
    try:
        config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
        # the files from_pretrained loads without a variant: model.safetensors, not model.fp16.safetensors
        weights = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.name.count(".") == 1)
    except (OSError, ValueError):
        return None
    if not weights:
        return None
    digests = tuple((p.name, pinned.get(f"{component}/{p.name}") or file_sha256(p)) for p in weights)  # memoized
    return json.dumps(config, sort_keys=True), digests
