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
        mine = _fingerprint(local.weights / name, local.manifest, name)
        if mine is not None and mine == _fingerprint(other.local.weights / name, other.local.manifest, name):
            shared[name] = loaded[name]
    if shared:
        log.info("%s shares %s with %s", local.manifest.name, ", ".join(shared), other.name)
    return shared


def _fingerprint(folder: Path, manifest, component: str) -> tuple | None:
    """(config without diffusers' bookkeeping keys, ((weight file, sha256), ...)) of one component folder."""
    try:
        config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
        weights = _loaded_weights([p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)], manifest.variant)
    except (OSError, ValueError):
        return None
    if not weights:
        return None
    pinned = manifest.files
    digests = tuple((p.name, pinned.get(f"{component}/{p.name}") or file_sha256(p)) for p in weights)  # memoized
    return json.dumps(config, sort_keys=True), digests


def _loaded_weights(paths: list[Path], variant: str | None) -> list[Path]:
    """The weight files from_pretrained loads from one component folder: the variant's (model.fp16.safetensors,
    model.fp16-00001-of-00002.safetensors) when the manifest names one and the folder has them, else the plain ones
    (model.safetensors, model-00001-of-00002.safetensors), as diffusers picks them per component."""
    if variant:
        chosen = sorted(p for p in paths if p.name.count(".") == 2 and p.name.split(".")[1].split("-")[0] == variant)
        if chosen:
            return chosen
    return sorted(p for p in paths if p.name.count(".") == 1)
