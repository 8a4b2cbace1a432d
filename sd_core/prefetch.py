"""Cold start's first move: download the preloaded models in a background thread before torch is even imported."""

# The adapters start a Prefetch before `from sd_core.engine import Engine` (torch, then diffusers in preload: seconds
# of imports), so the weights move (in storage's own threads; obstore's are Rust threads) while Python imports; then
# Engine.preload(prefetch) waits on these downloads instead of starting them. Nothing here imports torch.

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .catalog_storage import with_local_catalog
from .component_loading import Arrivals
from .manifests import LocalModel, ModelCatalog, ModelManifest, fetch_model
from .settings import Settings

log = logging.getLogger("sd_core.prefetch")


@dataclass
class Started:
    """One model's download: its future (a LocalModel) and, with SD_OVERLAP_LOAD, what it has landed so far."""

    future: Future[LocalModel]
    watch: Arrivals | None


def watch_for(manifest: ModelManifest, settings: Settings) -> Arrivals | None:
    """SD_OVERLAP_LOAD: a folder model's components load as their files land (sd_core/component_loading.py)."""
    return Arrivals() if settings.overlap_load and manifest.format != "single_file" else None


class Prefetch:
    """The downloads of SD_PRELOAD_MODELS, in order, one after another in one thread, started at construction.

    ``settings``: the settings with a remote SD_MODELS_DIR already copied locally (give them to the Engine so the
    catalog is read once; ``catalog``: the one already read from them). A manifest error is raised here; a download
    error when preload takes its result."""

    def __init__(self, settings: Settings, catalog: ModelCatalog | None = None):
        self.settings = with_local_catalog(settings)
        catalog = catalog or ModelCatalog.from_settings(self.settings)
        manifests = [catalog.get(name) for name in self.settings.models_to_preload]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-prefetch")
        self._started: dict[str, Started] = {}
        for manifest in manifests:
            watch = watch_for(manifest, self.settings)
            self._started[manifest.name] = Started(
                self._executor.submit(fetch_model, manifest, self.settings, watch), watch)
        self._executor.shutdown(wait=False)  # the thread ends after the last download
        if manifests:
            log.info("cold start: downloading %s while the engine is imported", ", ".join(self._started))

    def take(self, name: str) -> Started | None:
        """The download started for ``name`` (once: the caller now owns it), or None."""
        return self._started.pop(name, None)

    def cancel(self) -> None:
        """Drop the downloads nobody took (a cold start that failed before preload); a running one finishes."""
        for started in self._started.values():
            started.future.cancel()
        self._started.clear()
