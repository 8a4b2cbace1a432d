"""ControlNet preprocessors by the A1111 extension's module names: built in, or controlnet_aux on manifest weights."""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from . import storage
from .checkpoints import refuse_pickle
from .depth_anything import DepthAnythingDetector, build_depth_anything
from .device import free_memory
from .errors import InvalidRequest, ManifestError, SDError, quote, scrub
from .manifests import NAME_PATTERN, SHA256_PATTERN, read_manifest, resolve_uri
from .preprocessor_geometry import detect_padded, scribble
from .preprocessor_names import MODULES, WEIGHTS, canonical
from .preprocessor_nets import OpenposeBodyDetector, build_lineart_anime, build_openpose, lineart_anime_detector
from .settings import Settings

log = logging.getLogger("sd_core.preprocessors")

MANIFEST_NAME = "_preprocessors.yaml"  # in SD_MODELS_DIR; absent: only the preprocessors without weights


class PreprocessorEntry(BaseModel):
    """One preprocessor weights file (the annotator's state dict, converted to .safetensors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"which weights: one of {', '.join(WEIGHTS)}")
    uri: str = Field(min_length=1, description="the weights file (relative: joined onto SD_WEIGHTS_URI)")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    description: str = ""


class PreprocessorManifest(BaseModel):
    """models/_preprocessors.yaml: the weights of the worker's weight-based ControlNet preprocessors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("preprocessors", pattern=NAME_PATTERN)
    description: str = ""
    preprocessors: list[PreprocessorEntry] = Field(default_factory=list)


# Packages registered empty, their __init__ never run: controlnet_aux's imports every detector (and with them
# torchvision, timm, scikit-image, mediapipe), open_pose's the face network (torchvision) that body-only never needs.
BARE_PACKAGES = ("controlnet_aux", "controlnet_aux.open_pose")


def import_controlnet_aux(submodule: str):
    """``controlnet_aux.<submodule>``, imported without the __init__ of the BARE_PACKAGES on its way."""
    for name in BARE_PACKAGES:
        if name in sys.modules or not f"controlnet_aux.{submodule}".startswith(f"{name}."):
            continue
        spec = importlib.util.find_spec(name)  # (a subpackage's: found on its bare parent's path, not run)
        if spec is None or not spec.submodule_search_locations:
            raise ManifestError("controlnet_aux is not installed (requirements-nodeps.txt); weight-based "
                                "ControlNet preprocessors need it")
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[name] = package
    return importlib.import_module(f"controlnet_aux.{submodule}")


def build_network(weights: str, state: dict):
    """controlnet_aux's network for ``weights`` with ``state`` loaded (strict): built directly, never from a hub."""
    state = {key.removeprefix("module."): value for key, value in state.items()}  # PiDiNet's DataParallel prefix
    if weights in ("lineart", "lineart_coarse"):
        generator = import_controlnet_aux("lineart").Generator
        blocks = {key.split(".")[1] for key in state if key.startswith("model2.")}
        network = generator(3, 1, len(blocks))  # the annotators have 3 residual blocks; tiny twins fewer
    elif weights == "pidinet":
        network = import_controlnet_aux("pidi.model").pidinet()
    elif weights == "hed":
        network = import_controlnet_aux("hed").ControlNetHED_Apache2()
    elif weights == "mlsd":
        network = import_controlnet_aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
    elif weights in ("depth_anything", "depth_anything_v2"):  # loaded (strict), the hub's older key names renamed
        return build_depth_anything(state, 2 if weights.endswith("v2") else 1).float().eval()
    elif weights == "openpose":  # loaded (strict): sd_core/preprocessor_nets.py
        return build_openpose(state).float().eval()
    elif weights == "lineart_anime":
        return build_lineart_anime(state).float().eval()
    else:
        raise ManifestError(f"unknown preprocessor weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    network.load_state_dict(state, strict=True)
    return network.float().eval()


def detector(weights: str | None, network):
    """controlnet_aux's detector object around ``network`` (lineart_standard: none needed)."""
    if weights is None:
        return import_controlnet_aux("lineart_standard").LineartStandardDetector()
    if weights in ("lineart", "lineart_coarse"):
        return import_controlnet_aux("lineart").LineartDetector(network, network)
    if weights == "pidinet":
        return import_controlnet_aux("pidi").PidiNetDetector(network)
    if weights == "mlsd":
        return import_controlnet_aux("mlsd").MLSDdetector(network)
    if weights in ("depth_anything", "depth_anything_v2"):
        return DepthAnythingDetector(network)
    if weights == "openpose":
        return OpenposeBodyDetector(network)
    if weights == "lineart_anime":
        return lineart_anime_detector(network)
    return import_controlnet_aux("hed").HEDdetector(network)


def read_state(path: Path, settings: Settings) -> dict:
    """A weights file's tensors: .safetensors, or (only with SD_ALLOW_PICKLE=1) a torch pickle."""
    refuse_pickle(path, settings)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class Preprocessors:
    """One worker's ControlNet preprocessors (``engine.controlnets.preprocessors``): ``names()``, ``check(name)``,
    ``run(name, image, resolution)``. Weights are fetched like a model's on first use and stay loaded (a few MB
    to 60 MB each; Depth Anything large 1.3 GB), counted in SD_PIPELINE_MEMORY_MB with the models (share_budget);
    the networks run under the engine's GPU lock."""

    def __init__(self, settings: Settings, placement=None, gpu_lock: AbstractContextManager | None = None):
        self.settings = settings
        self.placement = placement
        self.gpu_lock = gpu_lock if gpu_lock is not None else threading.RLock()
        self.entries = self._read_entries()
        self._loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}
        self._load_lock = threading.Lock()
        self._pool = None  # the pipeline pool whose memory budget counts the networks (share_budget)
        self._other_bytes: Callable[[], int] = lambda: 0

    def _read_entries(self) -> dict[str, PreprocessorEntry]:
        path = Path(self.settings.models_dir) / MANIFEST_NAME
        if not path.is_file():
            return {}
        manifest = read_manifest(path, PreprocessorManifest, "preprocessor manifest")
        entries: dict[str, PreprocessorEntry] = {}
        for entry in manifest.preprocessors:
            if entry.name not in WEIGHTS:
                raise ManifestError(f"preprocessor weights {entry.name!r} in {path}: unknown; valid: "
                                    f"{', '.join(WEIGHTS)}")
            if entry.name in entries:
                raise ManifestError(f"preprocessor weights {entry.name!r} are defined twice in {path}")
            entries[entry.name] = entry
        return entries

    def names(self) -> list[str]:
        """The modules a request may name on this worker: those without weights, and those whose weights the
        manifest lists (the extension's /controlnet/module_list)."""
        return [name for name, module in MODULES.items() if module.weights is None or module.weights in self.entries]

    def check(self, name, field: str = "preprocessor") -> str:
        """``name`` as MODULES names it, if this worker has it; else InvalidRequest listing the available ones."""
        key = canonical(name)
        if key is None or key not in self.names():
            why = "has no weights on this worker" if key is not None else "is not a known preprocessor"
            raise InvalidRequest(f"{quote(name, 40)} {why}; available: {', '.join(self.names())}", field=field)
        return key

    def run(self, name: str, image, resolution: int, field: str = "preprocessor", options: dict | None = None):
        """The control map (PIL RGB) of ``image`` by a weight-based (or lineart_standard) module, with ``options``:
        the module's slider values (preprocessor_names.slider_options). The extension's geometry: the detector runs on
        the image with its short side at ``resolution``, edge-padded to multiples of 64, and its map is cropped back
        (sd_core/preprocessor_geometry.py); the scribble modules' step comes after the crop, as there."""
        import numpy as np

        key = self.check(name, field)
        module = MODULES[key]
        found = detector(module.weights, self._network(module.weights, field) if module.weights else None)
        options = {**module.options, **(options or {})}
        scribbled = options.pop("scribble", False)

        def detect(pixels, side: int):  # controlnet_aux's detectors leave an image already at ``side`` as it is
            if module.weights is None:
                return found(pixels, detect_resolution=side, output_type="np")
            with self.gpu_lock:
                return found(pixels, detect_resolution=side, image_resolution=side, output_type="np", **options)

        try:
            result = detect_padded(detect, np.asarray(image.convert("RGB"), dtype=np.uint8), resolution)
        except InvalidRequest as exc:  # an image the module cannot take (depth_anything: too elongated)
            exc.field = field
            raise
        if scribbled:
            result = scribble(result)
        return Image.fromarray(result).convert("RGB")

    @property
    def loaded(self) -> list[str]:
        """The weights whose networks are in memory, least recently used first."""
        return list(self._loaded)

    def nbytes(self) -> int:
        """Bytes of the loaded networks (counted in the pipeline pool's budget: share_budget)."""
        return sum(self._sizes.values())

    def share_budget(self, pool, other_bytes: Callable[[], int]) -> None:
        """Count the networks in ``pool``'s memory budget (a PipelinePool; ``other_bytes``: the rest it counts
        besides its models, the loaded ControlNets): a network about to load first evicts the least recently used
        other networks (quick to load again) while the budget would be exceeded, then the pool's older models."""
        self._pool, self._other_bytes = pool, other_bytes

    def _network(self, weights: str, field: str):
        with self._load_lock:
            if weights in self._loaded:
                self._loaded.move_to_end(weights)
                return self._loaded[weights]
            entry = self.entries[weights]
            path = Path(storage.fetch(resolve_uri(entry.uri, self.settings), self.settings, sha256=entry.sha256,
                                      size=entry.size))
            try:
                network = build_network(weights, read_state(path, self.settings))
            except SDError as exc:  # a refused pickle: the unit's field names it
                exc.field = exc.field if exc.field not in (None, "model") else field
                raise
            except Exception as exc:  # not this network's state dict, or a damaged file
                raise ManifestError(f"preprocessor weights {weights!r} ({scrub(entry.uri)}): cannot load them "
                                    f"({type(exc).__name__}: {str(exc)[:200]})") from None
            size = sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))
            with self.gpu_lock:  # evictions and the move to the device: not while a job runs on the GPU
                self._make_room(size)
                if self.placement is not None:
                    network.to(self.placement.device)
                self._loaded[weights] = network
                self._sizes[weights] = size
            log.info("preprocessor weights %s loaded (%.0f MB)", weights, size / 2**20)
            return network

    def _make_room(self, incoming: int) -> None:
        if self._pool is None:
            return
        while self._loaded and (self._pool.used_bytes + self._other_bytes() + self.nbytes() + incoming
                                > self._pool.budget):
            old, _ = self._loaded.popitem(last=False)
            self._sizes.pop(old, None)
            log.info("preprocessor weights %s unloaded to stay within the %.0f MB model budget", old,
                     self._pool.budget / 2**20)
            if self.placement is not None:
                free_memory(self.placement)
        loaded = self._pool.loaded
        self._pool.make_room(loaded[-1] if loaded else None, incoming)  # the most recently used model stays
