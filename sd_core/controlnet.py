"""ControlNet units: resolving them (control images, fetched weights), a small LRU of loaded ControlNets, and the
ControlNet pipeline (diffusers' from_pipe on the loaded model: no second copy of its weights) with its call kwargs."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .checkpoints import refuse_pickle, refuse_pickle_folder
from .control_images import control_image
from .device import Placement, free_memory
from .errors import FetchError, InvalidRequest, ModelNotFound, quote
from .input_images import load_image
from .manifests import ControlNetEntry, ModelCatalog, ModelManifest, resolve_uri
from .preprocessors import Preprocessors
from .schema import GenerationRequest
from .settings import Settings

log = logging.getLogger("sd_core.controlnet")

FIELD = "controlnets"


@dataclass(frozen=True, eq=False)
class ResolvedControl:
    """One unit ready for the GPU: its fetched ControlNet, the control map at the output size, scale and window."""

    name: str
    key: tuple[str, str]  # (manifest listing it, ControlNet name): the loaded-model cache key
    weights: Path
    config: Path | None  # single-file ControlNets: the folder holding config.json
    image: object  # PIL image, width x height
    scale: float
    start: float
    end: float
    guess_mode: bool
    field: str  # controlnets.<i>, for errors


class ControlNets:
    """Resolves a request's units (outside the GPU lock) and loads ControlNets (inside it), at most
    SD_CONTROLNET_MAX_LOADED of them (least recently used out first)."""

    def __init__(self, settings: Settings, catalog: ModelCatalog, placement: Placement):
        self.settings = settings
        self.catalog = catalog
        self.placement = placement
        self._loaded: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self._pipes: weakref.WeakSet = weakref.WeakSet()  # the ControlNet pipelines made (held by their models)
        self._lock = threading.Lock()
        # (model kept, bytes incoming): the pipeline pool's make_room, so that loaded ControlNets count in its budget
        self.preprocessors = Preprocessors(settings, placement)  # the engine gives it its GPU lock
        self.make_room: Callable[[str, int], None] | None = None

    # --- before the GPU lock ------------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest, manifest: ModelManifest, width: int,
                height: int) -> tuple[ResolvedControl, ...]:
        """The request's units with a scale above 0 (a unit at scale 0 is skipped: exactly the image without it),
        each with its control image decoded, preprocessed and fitted to width x height, and its weights fetched."""
        units = [(i, unit) for i, unit in enumerate(request.controlnets) if unit.scale > 0]
        if not units:
            return ()
        if manifest.family.controlnet_pipelines is None:
            raise InvalidRequest(f"{manifest.name} ({manifest.architecture}) takes no ControlNets", field=FIELD)
        modes = {unit.mode for _, unit in units}
        for i, unit in units:
            if unit.mode == "prompt":
                raise InvalidRequest("'prompt' (My prompt is more important) is not supported by this worker; use "
                                     "balanced or control (ControlNet is more important)", field=f"{FIELD}.{i}.mode")
        if len(modes) > 1:
            raise InvalidRequest("all units of a request must share one mode (diffusers' guess_mode applies to the "
                                 f"whole call); got {', '.join(sorted(modes))}", field=FIELD)
        resolved = []
        for i, unit in units:
            where = f"{FIELD}.{i}"
            found = self.catalog.find_controlnet(unit.model.strip(), manifest)
            if found is None:
                known = sorted({e.name for m in self.catalog.manifests.values()
                                if m.architecture == manifest.architecture for e in m.controlnets})
                raise ModelNotFound(f"unknown ControlNet {quote(unit.model)} for {manifest.name} "
                                    f"({manifest.architecture}); available: {', '.join(known) or 'none'}",
                                    field=f"{where}.model")
            entry, owner = found
            preprocessor = self.preprocessors.check(unit.preprocessor, f"{where}.preprocessor")
            source = load_image(unit.image, f"{where}.image", self.settings)
            image = control_image(source, width=width, height=height, preprocessor=preprocessor,
                                  resize_mode=unit.resize_mode, processor_res=unit.processor_res,
                                  low=unit.low_threshold, high=unit.high_threshold, preprocessors=self.preprocessors)
            weights, config = self._fetch(entry, f"{where}.model")
            resolved.append(ResolvedControl(
                name=entry.name, key=(owner.name, entry.name), weights=weights, config=config, image=image,
                scale=unit.scale, start=unit.start, end=unit.end, guess_mode=unit.mode == "control", field=where))
        return tuple(resolved)

    def _fetch(self, entry: ControlNetEntry, field: str) -> tuple[Path, Path | None]:
        try:
            weights = storage.fetch(resolve_uri(entry.uri, self.settings), self.settings, sha256=entry.sha256,
                                    size=entry.size, files=entry.files or None)
            config = None
            if entry.config_uri:
                config = storage.fetch(resolve_uri(entry.config_uri, self.settings), self.settings)
        except FetchError as exc:
            raise type(exc)(f"ControlNet {entry.name}: {exc.message}", field=field) from None
        return Path(weights), Path(config) if config is not None else None

    # --- inside the GPU lock ------------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """Names of the ControlNets in memory, least recently used first."""
        return [name for _, name in self._loaded]

    def nbytes(self) -> int:
        """Bytes of the loaded ControlNets' weights (the pipeline pool counts them in its memory budget)."""
        return sum(self._sizes.values())

    def pipeline(self, model, mode: str, controls: tuple[ResolvedControl, ...]):
        """``model``'s ControlNet pipeline for ``mode`` with exactly ``controls``' ControlNets (one, or several as
        diffusers' MultiControlNetModel); made once per mode with from_pipe, sharing the model's weights."""
        import diffusers

        modules = [self._get(model, control) for control in controls]
        controlnet = modules[0] if len(modules) == 1 else diffusers.MultiControlNetModel(modules)
        key = ("controlnet", mode)
        pipe = model.pipes.get(key)
        if pipe is None:
            cls = model.manifest.family.controlnet_pipeline_class(mode)
            pipe = cls.from_pipe(model.pipeline("txt2img"), controlnet=controlnet)
            pipe.set_progress_bar_config(disable=True)
            model.pipes[key] = pipe
            self._pipes.add(pipe)
        else:
            pipe.controlnet = controlnet
        return pipe

    def _get(self, model, control: ResolvedControl):
        with self._lock:
            if control.key in self._loaded:
                self._loaded.move_to_end(control.key)
                module = self._loaded[control.key]
                self._check_fits(model, control, module.config)
                return module
            config = self._read_config(control)
            self._check_fits(model, control, config)
            module = self._load(control)
            limit = max(1, self.settings.controlnet_max_loaded)
            while len(self._loaded) >= limit:
                old, unloaded = self._loaded.popitem(last=False)
                self._sizes.pop(old, None)
                self._detach(unloaded)
                log.info("ControlNet %s unloaded (SD_CONTROLNET_MAX_LOADED=%d)", old[1], limit)
                free_memory(self.placement)
            self._loaded[control.key] = module
            self._sizes[control.key] = sum(t.numel() * t.element_size()
                                           for t in (*module.parameters(), *module.buffers()))
            if self.make_room is not None:  # evict other models if the budget is now exceeded
                self.make_room(model.name, 0)
            return module

    def _detach(self, module) -> None:
        """Drop an unloaded ControlNet from the pipelines still holding it, so that its memory is freed."""
        for pipe in list(self._pipes):
            held = getattr(pipe, "controlnet", None)
            if held is module or module in getattr(held, "nets", ()):
                pipe.controlnet = None

    def _read_config(self, control: ResolvedControl) -> dict:
        from diffusers import ControlNetModel

        return dict(ControlNetModel.load_config(str(control.config or control.weights), local_files_only=True))

    @staticmethod
    def _check_fits(model, control: ResolvedControl, config) -> None:
        """A ControlNet made for another architecture is refused before it runs (its cross-attention width and
        added conditioning must be the UNet's)."""
        unet = model.pipeline("txt2img").unet.config
        theirs = (config.get("cross_attention_dim"), config.get("addition_embed_type"))
        ours = (unet.cross_attention_dim, unet.addition_embed_type)
        if theirs != ours:
            kind = "SDXL" if theirs[1] == "text_time" else "SD1.x/SD2"
            raise InvalidRequest(
                f"ControlNet {quote(control.name)} is made for another architecture ({kind}-like: cross_attention_dim "
                f"{theirs[0]}) than {model.name} ({model.manifest.architecture}: cross_attention_dim {ours[0]})",
                field=f"{control.field}.model")

    def _load(self, control: ResolvedControl):
        from diffusers import ControlNetModel

        started = time.perf_counter()
        common = {"torch_dtype": self.placement.dtype, "local_files_only": True}
        if control.config is not None:
            refuse_pickle(control.weights, self.settings)
            module = ControlNetModel.from_single_file(str(control.weights), config=str(control.config), **common)
        else:
            refuse_pickle_folder(control.weights, self.settings)  # pickle files beside safetensors: never loaded
            module = ControlNetModel.from_pretrained(
                str(control.weights), use_safetensors=None if self.settings.allow_pickle else True, **common)
        module.to(self.placement.device).eval()
        log.info("ControlNet %s loaded in %.2fs", control.name, time.perf_counter() - started)
        return module


def pipe_kwargs(controls: tuple[ResolvedControl, ...], mode: str) -> dict:
    """The ControlNet pipeline's keyword arguments for ``controls`` (one unit: plain values; several: lists)."""

    def value(items: list):
        return items[0] if len(items) == 1 else items

    return {
        "image" if mode == "txt2img" else "control_image": value([c.image for c in controls]),
        "controlnet_conditioning_scale": value([c.scale for c in controls]),
        "control_guidance_start": value([c.start for c in controls]),
        "control_guidance_end": value([c.end for c in controls]),
        "guess_mode": controls[0].guess_mode,
    }
