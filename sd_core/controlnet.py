"""ControlNet units: resolving them (control images, fetched weights), a small LRU of loaded ControlNets, and the
ControlNet pipeline (diffusers' from_pipe on the loaded model: no second copy of its weights) with its call kwargs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .checkpoints import refuse_pickle, refuse_pickle_folder
from .control_images import detected_map, fit
from .device import Placement, free_memory
from .errors import FetchError, InvalidRequest, ModelNotFound, quote
from .input_images import load_image
from .limits import UNION_CONTROL_TYPES
from .manifests import ControlNetEntry, ModelCatalog, ModelManifest, resolve_uri
from .preprocessor_names import slider_options
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
    soft: bool = False  # "My prompt is more important": residuals scaled per block (sd_core/controlnet_modes.py)
    preprocessor: str = "none"
    hires_option: str = "both"  # which passes of a hires fix it steers
    hires_image: object = None  # the control map at a hires fix's final size (None without a hires fix)
    union_mode: int | None = None  # a Union ControlNet's control type: diffusers' control_mode index


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
    def resolve(self, request: GenerationRequest, manifest: ModelManifest, width: int, height: int,
                hires_size: tuple[int, int] | None = None) -> tuple[ResolvedControl, ...]:
        """The request's units with a scale above 0 (a unit at scale 0 is skipped: exactly the image without it),
        each with its control image decoded, preprocessed and fitted to width x height (and to ``hires_size``, a
        hires fix's final size, from the same detected map as the extension does), and its weights fetched."""
        units = [(i, unit) for i, unit in enumerate(request.controlnets) if unit.scale > 0]
        if not units:
            return ()
        family = manifest.family
        if family.controlnet_pipelines is None:
            raise InvalidRequest(f"{manifest.name} ({manifest.architecture}) takes no ControlNets", field=FIELD)
        if family.controlnet_pipeline_class(request.mode) is None:
            raise InvalidRequest(f"{manifest.name} ({manifest.architecture}) takes ControlNets in "
                                 f"{', '.join(family.controlnet_pipelines)} only here, not {request.mode}", field=FIELD)
        for i, unit in units:
            if unit.mode not in family.controlnet_modes:
                modes = ", ".join(family.controlnet_modes)
                raise InvalidRequest(f"{manifest.name} ({manifest.architecture}) runs ControlNets in {modes} mode only "
                                     f"here, not {quote(unit.mode)}", field=f"{FIELD}.{i}.mode")
        modes = {unit.mode for _, unit in units}
        if "control" in modes and len(modes) > 1:
            raise InvalidRequest("'control' (ControlNet is more important, diffusers' guess_mode) applies to the whole "
                                 f"call: all units must use it or none; got {', '.join(sorted(modes))}", field=FIELD)
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
            union_mode = check_union(entry, unit, manifest, where, len(units))
            source = load_image(unit.image, f"{where}.image", self.settings)
            detected = detected_map(source, width=width, height=height, preprocessor=preprocessor,
                                    resize_mode=unit.resize_mode, processor_res=unit.processor_res,
                                    low=unit.low_threshold, high=unit.high_threshold, preprocessors=self.preprocessors,
                                    options=slider_options(preprocessor, unit))
            hires_image = fit(detected, *hires_size, unit.resize_mode) if hires_size else None
            weights, config = self._fetch(entry, f"{where}.model")
            resolved.append(ResolvedControl(
                name=entry.name, key=(owner.name, entry.name), weights=weights, config=config,
                image=fit(detected, width, height, unit.resize_mode), scale=unit.scale, start=unit.start,
                end=unit.end, guess_mode=unit.mode == "control", field=where, soft=unit.mode == "prompt",
                preprocessor=preprocessor, hires_option=unit.hires_option, hires_image=hires_image,
                union_mode=union_mode))
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

        family = model.manifest.family
        modules = [self._get(model, control) for control in controls]
        family.prepare_controlnets(model.pipeline("txt2img"), modules)
        controlnet = modules[0] if len(modules) == 1 else getattr(diffusers, family.multi_controlnet_model)(modules)
        union = controls[0].union_mode is not None
        key = ("controlnet-union" if union else "controlnet", mode)
        pipe = model.pipes.get(key)
        if pipe is None:
            cls = family.controlnet_pipeline_class(mode)
            if union:
                cls = getattr(diffusers, union_class_name(cls.__name__))
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
            module = self._load(control, model.manifest.family.controlnet_model)
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

        config = dict(ControlNetModel.load_config(str(control.config or control.weights), local_files_only=True))
        if (config.get("_class_name") == "ControlNetUnionModel") != (control.union_mode is not None):
            negation = "" if control.union_mode is None else "not "
            raise InvalidRequest(f"ControlNet {quote(control.name)}'s weights are {negation}a Union ControlNet, "
                                 "unlike its manifest entry (`union:`)", field=f"{control.field}.model")
        return config

    @staticmethod
    def _check_fits(model, control: ResolvedControl, config) -> None:
        """A ControlNet made for another architecture is refused before it runs (the family's
        ``controlnet_mismatch``: a UNet's cross-attention width and added conditioning, an MMDiT's widths)."""
        family = model.manifest.family
        denoiser = getattr(model.pipeline("txt2img"), family.denoiser).config
        types = config.get("num_control_type")
        if control.union_mode is not None and types is not None and control.union_mode >= types:
            raise InvalidRequest(f"Union ControlNet {quote(control.name)} knows {types} control types: "
                                 f"{', '.join(UNION_CONTROL_TYPES[:types])}", field=f"{control.field}.control_type")
        mismatch = family.controlnet_mismatch(denoiser, dict(config))
        if mismatch is not None:
            theirs, ours = mismatch
            raise InvalidRequest(
                f"ControlNet {quote(control.name)} is made for another architecture ({theirs}) than {model.name} "
                f"({model.manifest.architecture}: {ours})", field=f"{control.field}.model")

    def _load(self, control: ResolvedControl, class_name: str):
        """Load a ControlNet as diffusers' ``class_name`` (the family's; a Union ControlNet as its own class)."""
        import diffusers

        ControlNetModel = getattr(diffusers, "ControlNetUnionModel" if control.union_mode is not None  # noqa: N806
                                  else class_name)
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


def pipe_kwargs(controls: tuple[ResolvedControl, ...], mode: str, family) -> dict:
    """The ControlNet pipeline's keyword arguments for ``controls`` (one unit: plain values; several: lists), as
    ``family``'s (a ModelFamily) pipeline names them; guess_mode only where the family runs "control" mode."""

    def value(items: list):
        return items[0] if len(items) == 1 else items

    if controls[0].union_mode is not None:  # one Union unit (check_union): its map and control type as lists
        control = controls[0]
        return {"control_image": [control.image], "control_mode": [control.union_mode],
                "controlnet_conditioning_scale": control.scale, "control_guidance_start": control.start,
                "control_guidance_end": control.end, "guess_mode": control.guess_mode}
    kwargs = {
        family.controlnet_image_kwarg(mode): value([c.image for c in controls]),
        "controlnet_conditioning_scale": value([c.scale for c in controls]),
        "control_guidance_start": value([c.start for c in controls]),
        "control_guidance_end": value([c.end for c in controls]),
    }
    if "control" in family.controlnet_modes:
        kwargs["guess_mode"] = controls[0].guess_mode
    return kwargs


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Within the block, torch's global RNG seeded with ``seed`` (restored afterwards): diffusers' SD3 ControlNet
    pipeline samples the control image's VAE latents without the call's generator, so without this the same request
    would give other pixels each time. SD/SDXL pipelines draw nothing from it (no change to their images)."""
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


def union_class_name(name: str) -> str:
    """A family's ControlNet pipeline class name -> its Union ControlNet twin (SDXL's, in diffusers)."""
    return name.replace("ControlNet", "ControlNetUnion", 1)


def check_union(entry: ControlNetEntry, unit, manifest: ModelManifest, field: str, units: int) -> int | None:
    """A unit's Union control type as diffusers' control_mode index (None for a plain ControlNet); refused: a
    control_type on a plain ControlNet, a Union one without it, on a family without Union pipelines, or next to
    other units (diffusers' Union pipelines run one Union ControlNet)."""
    if not entry.union:
        if unit.control_type is not None:
            raise InvalidRequest(f"ControlNet {quote(entry.name)} is no Union ControlNet: leave control_type empty",
                                 field=f"{field}.control_type")
        return None
    import diffusers

    plain = manifest.family.controlnet_pipeline_class("txt2img")
    if plain is None or not hasattr(diffusers, union_class_name(plain.__name__)):
        raise InvalidRequest(f"{manifest.name} ({manifest.architecture}) takes no Union ControlNets (SDXL only)",
                             field=f"{field}.model")
    if unit.control_type is None:
        raise InvalidRequest(f"Union ControlNet {quote(entry.name)} needs a control_type: one of "
                             f"{', '.join(UNION_CONTROL_TYPES)}", field=f"{field}.control_type")
    if units > 1:
        raise InvalidRequest("a Union ControlNet unit runs alone here (no other unit in the request)", field=field)
    return UNION_CONTROL_TYPES.index(unit.control_type)
