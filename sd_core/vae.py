"""Alternate VAEs (a manifest's `vaes:`): a request's `vae` resolved and fetched, loaded per model, swapped per call."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .checkpoints import refuse_pickle, refuse_pickle_folder
from .device import free_memory, is_out_of_memory
from .errors import FetchError, ManifestError, ModelNotFound, OutOfMemory, quote
from .manifests import ModelManifest, VaeEntry, fetch_vae, is_own_vae
from .settings import Settings

log = logging.getLogger("sd_core.vae")

FIELD = "vae"
_EXTENSION = ".safetensors"  # A1111 names VAEs by file name: "my-vae.safetensors" is the manifest's "my-vae"


@dataclass(frozen=True)
class ResolvedVae:
    """A request's VAE, fetched: its manifest name, local file or folder, and the file's sha256 (None: a folder)."""

    name: str
    path: Path
    is_folder: bool
    sha256: str | None

    @property
    def key(self) -> tuple[str, str]:
        """Same key, same weights: what batches and the per-model cache tell VAEs apart by."""
        return (self.name, str(self.path))


def entry_name(value: str) -> str:
    """A requested VAE name as the manifest spells it: surrounding space and a `.safetensors` extension dropped."""
    name = value.strip()
    return name[: -len(_EXTENSION)] if name.lower().endswith(_EXTENSION) else name


class VaeManager:
    """Resolves a request's `vae` (stage 4, no GPU) and loads alternate VAEs for a model (stage 5, GPU lock held).

    Loaded VAEs live on their LoadedModel (``model.vaes``, least recently used first, at most SD_VAE_MAX_LOADED),
    so they count in its memory and go when the model is evicted; the model itself is never reloaded.
    """

    def __init__(self, settings: Settings):
        self.settings = settings

    def resolve(self, value: str | None, manifest: ModelManifest) -> ResolvedVae | None:
        """The VAE named by a request for ``manifest``'s model, fetched and verified; None for the model's own."""
        if is_own_vae(value):
            return None
        name = entry_name(value)
        entry = next((vae for vae in manifest.vaes if vae.name == name), None)
        if entry is None:
            known = ", ".join(vae.name for vae in manifest.vaes) or "none"
            raise ModelNotFound(f"unknown VAE {quote(value)} for {manifest.name}; available: {known} (or Automatic / "
                                "None: the model's own)", field=FIELD)
        return self._fetch(entry)

    def _fetch(self, entry: VaeEntry) -> ResolvedVae:
        started = time.perf_counter()
        try:
            path = Path(fetch_vae(entry, self.settings))
        except FetchError as exc:  # operator's manifest: the worker's problem, not the request's
            raise type(exc)(f"VAE {entry.name}: {exc.message}", field=FIELD) from None
        if entry.is_folder:
            sha256 = None
            refuse_pickle_folder(path, self.settings)  # pickle files beside safetensors: ignored, never loaded
        else:
            refuse_pickle(path, self.settings)
            sha256 = entry.sha256 or storage.file_sha256(path)  # A1111's `VAE hash`: the file's sha256
        log.debug("VAE %s ready at %s in %.2fs", entry.name, path, time.perf_counter() - started)
        return ResolvedVae(name=entry.name, path=path, is_folder=entry.is_folder, sha256=sha256)

    # --- inside the GPU lock ------------------------------------------------------------------------------
    def module(self, model, vae: ResolvedVae | None) -> tuple[object | None, bool]:
        """(the AutoencoderKL for ``vae`` on ``model``, whether it was loaded just now); (None, False) for the
        model's own. Loaded with the model's dtype and device; a single file with the model's own VAE config."""
        if vae is None:
            return None, False
        cache = model.vaes
        if vae.key in cache:
            cache.move_to_end(vae.key)
            return cache[vae.key], False
        while cache and len(cache) >= max(1, self.settings.vae_max_loaded):
            cache.popitem(last=False)
        started = time.perf_counter()
        try:
            module = self._load(model, vae)
        except Exception as exc:  # an operator's manifest: a file that is no VAE of this model's architecture, ...
            if is_out_of_memory(exc):
                free_memory(model.placement)
                raise OutOfMemory(f"ran out of memory loading VAE {vae.name}", field=FIELD) from None
            log.exception("VAE %s cannot be loaded for %s", vae.name, model.name)
            raise ManifestError(f"VAE {vae.name} cannot be loaded for {model.name} ({type(exc).__name__}); see the "
                                "worker's logs", field=FIELD) from None
        cache[vae.key] = module
        log.info("loaded VAE %s for %s in %.2fs", vae.name, model.name, time.perf_counter() - started)
        return module, True

    def _load(self, model, vae: ResolvedVae):
        from diffusers import AutoencoderKL

        placement = model.placement
        common = {"torch_dtype": placement.dtype, "local_files_only": True}
        if vae.is_folder:
            safetensors_only = None if self.settings.allow_pickle else True
            module = AutoencoderKL.from_pretrained(str(vae.path), use_safetensors=safetensors_only, **common)
        else:  # the model's own VAE config (scaling factor, upcast) from its local config folder, never the hub
            module = AutoencoderKL.from_single_file(str(vae.path), config=str(model.config_dir), subfolder="vae",
                                                    **common)
        module.to(placement.device)
        module.eval()
        if self.settings.attention == "xformers" and placement.is_cuda:
            with contextlib.suppress(Exception):  # as the model's own VAE: optimize() logged the outcome
                module.enable_xformers_memory_efficient_attention()
        return module


@contextlib.contextmanager
def swapped(pipe, model, module) -> Iterator[None]:
    """``pipe`` runs with the VAE ``module`` (None: the model's own) inside the block; the model's own VAE is back
    afterwards, also when the block raises (cancelled, out of memory)."""
    own = model.own_vae
    pipe.vae = own if module is None else module
    try:
        yield
    finally:
        if pipe.vae is not own:
            pipe.vae = own
