"""Loading diffusers pipelines (folder or single file, never the hub) and keeping them in a memory-bounded LRU."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from .checkpoints import refuse_pickle, refuse_pickle_folder
from .device import Placement, free_memory, optimize, total_memory_bytes
from .manifests import LocalModel, ModelCatalog, fetch_model
from .memory_options import memory_plan, place
from .settings import Settings
from .shared_modules import shared_components

log = logging.getLogger("sd_core.pipelines")


def quiet_loaders() -> None:
    """Our own log lines report loading; the libraries' per-component progress bars only clutter worker logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class LoadedModel:
    """One model in memory: the txt2img pipeline, img2img/inpaint views sharing its weights, built schedulers."""

    def __init__(self, local: LocalModel, pipe, placement: Placement):
        self.local = local
        self.manifest = local.manifest
        self.name = local.manifest.name
        self.placement = placement
        self.pipes = {"txt2img": pipe}
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, object] = {}
        self.config_dir = local.config or local.weights  # diffusers configs (vae/config.json: alternate VAE files)
        self.own_vae = pipe.vae
        self.vaes: OrderedDict[tuple, torch.nn.Module] = OrderedDict()  # alternate VAEs loaded (sd_core/vae.py)

    @property
    def module_bytes(self) -> dict[int, int]:
        """Bytes per module held, by identity (a module shared with another loaded model is counted once by the
        pool): the pipeline's components as they are now (embeddings grow a text encoder), its own VAE and the
        alternate VAEs loaded for it."""
        components = [m for m in self.pipes["txt2img"].components.values() if isinstance(m, torch.nn.Module)]
        return {id(module): module_bytes(module) for module in (*components, self.own_vae, *self.vaes.values())
                if module is not None}

    @property
    def nbytes(self) -> int:
        """Memory held: the pipeline's weights and the alternate VAEs loaded for it."""
        return sum(self.module_bytes.values())

    def pipeline(self, mode: str):
        """The pipeline for ``mode``; img2img/inpaint are made once with from_pipe (no second copy of weights)."""
        if mode not in self.pipes:
            self.pipes[mode] = self.manifest.family.pipeline_class(mode).from_pipe(self.pipes["txt2img"])
        return self.pipes[mode]

    def scheduler(self, name: str, steps: int | None = None, sigmas: bool = False):
        """The scheduler ``name`` for runs of ``steps`` steps, built once from this model's own scheduler config (one
        object for every run of more than one step, another for one-step runs), then reused; ``sigmas``: the one
        running a request's own sigmas (flow-matching families' ``sigma_scheduler``)."""
        key = ("sigmas",) if sigmas else (name, steps == 1)
        if key not in self._schedulers:
            family, config = self.manifest.family, self.base_scheduler_config
            self._schedulers[key] = (family.sigma_scheduler(config) if sigmas
                                     else family.build_scheduler(name, config, 1 if steps == 1 else None))
        return self._schedulers[key]


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def load_options(manifest, settings: Settings, placement: Placement, plan=None) -> dict:
    """The keyword arguments of a folder model's ``from_pretrained`` (and of its components loaded early): the plan's
    dtype, safetensors only unless SD_ALLOW_PICKLE, and SD_LOAD_TO_DEVICE's ``device_map`` (weights read straight
    onto the device; not with CPU offload or fp8, which place the weights themselves)."""
    plan = plan or memory_plan(manifest, settings, placement)
    # True: safetensors only. None (SD_ALLOW_PICKLE): safetensors first, pickle files where there are no others.
    options = {"dtype": plan.dtype, "local_files_only": True,
               "use_safetensors": None if settings.allow_pickle else True}
    if settings.load_to_device and plan.offload == "none" and plan.quantize == "none":
        options["device_map"] = placement.device.type  # diffusers: "cuda" or "cpu" (a device type, not an index)
    return options


def load_pipeline(local: LocalModel, settings: Settings, placement: Placement, share_from=None,
                  early: dict | None = None) -> LoadedModel:
    """Load a fetched model onto the device. Single files use the manifest's local config folder, never the hub.
    Components equal to those of ``share_from`` (a LoadedModel) are taken from it, not loaded again; ``early``
    holds components loaded while the folder was still downloading (sd_core/component_loading.py)."""
    manifest = local.manifest
    cls = manifest.family.pipeline_class("txt2img")
    plan = memory_plan(manifest, settings, placement)  # the family's dtype; fp8 / offload refused before loading
    quiet_loaders()
    started = time.perf_counter()
    if manifest.format == "single_file":
        refuse_pickle(local.weights, settings)
        pipe = manifest.family.load_single_file(cls, str(local.weights), str(local.config), dtype=plan.dtype,
                                                local_files_only=True, **manifest.skipped)
    else:
        refuse_pickle_folder(local.weights, settings)  # pickle files beside safetensors: ignored, never loaded
        shared = shared_components(local, share_from)
        components = {**(early or {}), **shared, **manifest.skipped}  # a skipped component is None, never loaded
        pipe = cls.from_pretrained(str(local.weights), variant=manifest.variant,
                                   **load_options(manifest, settings, placement, plan), **components)
    for component in pipe.components.values():  # inference mode for all: diffusers' single-file T5 loader (SD3)
        if isinstance(component, torch.nn.Module):  # leaves T5 training, its dropout on (a different image each call)
            component.eval()
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # sd_core.safety runs the checker as a post-pass (docs/security.md).
    place(pipe, plan, manifest.family, placement)  # to the device, or CPU-offloaded; fp8 denoiser if planned
    pipe.set_progress_bar_config(disable=True)
    optimize(pipe, settings, placement)
    model = LoadedModel(local, pipe, placement)
    log.info("loaded %s (%s, %.0f MB) in %.2fs", model.name, manifest.format, model.nbytes / 2**20,
             time.perf_counter() - started)
    return model


class ModelLoader:
    """Fetch + load of one model by name, for the pool; preload puts models it fetched ahead in ``prefetched``."""

    def __init__(self, catalog: ModelCatalog, settings: Settings, placement: Placement, model_urls=None):
        self.catalog = catalog
        self.settings = settings
        self.placement = placement
        self.model_urls = model_urls  # sd_core.model_urls.ModelUrls: models requested by URL (synthetic manifests)
        # fetched ahead (preload's background thread; a model URL's file in stage 4), not loaded yet
        self.prefetched: dict[str, LocalModel] = {}
        self.early: dict[str, dict] = {}  # components preload loaded while a model's folder downloaded

    def load(self, name: str, share_from: LoadedModel | None = None) -> LoadedModel:
        local = self.prefetched.pop(name, None) or self._fetch(name)
        return load_pipeline(local, self.settings, self.placement, share_from, early=self.early.pop(name, None))

    def _fetch(self, name: str) -> LocalModel:
        if self.model_urls is not None and self.model_urls.owns(name):
            return self.model_urls.fetch(self.model_urls.manifest(name))
        return fetch_model(self.catalog.get(name), self.settings)


class PipelinePool:
    """Loaded models by name, least-recently-used first out when their total size passes the memory budget."""

    def __init__(self, settings: Settings, placement: Placement, loader: ModelLoader):
        self.placement = placement
        self.budget = settings.pipeline_memory_mb * 2**20 or int(total_memory_bytes(placement) * (
            0.8 if placement.is_cuda else 0.5))
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.extra_bytes: Callable[[], int] = lambda: 0  # other weights in the budget (ControlNets, preprocessors)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    @property
    def loaded(self) -> list[str]:
        return list(self._models)

    @property
    def used_bytes(self) -> int:
        """The loaded models' weights; a module several models share (sd_core/shared_modules.py) counted once."""
        return sum({key: size for m in self._models.values() for key, size in m.module_bytes.items()}.values())

    def get(self, name: str, expected_bytes: int = 0, share_from: str | None = None) -> LoadedModel:
        """The loaded model ``name``, loading it (after making room) if needed; a new load takes the components it
        has in common with the loaded model ``share_from`` from it (sd_core/shared_modules.py)."""
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            self._evict(keep=None, incoming=expected_bytes)
            model = self._loader.load(name, self._models.get(share_from) if share_from else None)
            self._models[name] = model
            self._evict(keep=name, incoming=0)
            return model

    def fit(self, keep: str) -> None:
        """Evict other models if ``keep`` grew past the budget (an alternate VAE was loaded for it)."""
        with self._lock:
            self._evict(keep=keep, incoming=0)

    def make_room(self, keep: str, incoming: int) -> None:
        """Evict other models until ``incoming`` more bytes (a ControlNet about to load) fit the budget."""
        with self._lock:
            self._evict(keep=keep, incoming=incoming)

    def _evict(self, keep: str | None, incoming: int) -> None:
        while self.used_bytes + self.extra_bytes() + incoming > self.budget:
            victim = next((n for n in self._models if n != keep), None)
            if victim is None:
                break
            log.info("evicting %s to stay within the %.0f MB model budget", victim, self.budget / 2**20)
            del self._models[victim]
            free_memory(self.placement)
