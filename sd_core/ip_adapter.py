"""IP-Adapter image prompts: resolving a request's adapter and images, (un)loading it on a model, A1111 units."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .a1111_ip_adapter import FACE_ID_REASON, is_face_id
from .checkpoints import checkpoint_keys, is_readable_safetensors, refuse_pickle
from .errors import FetchError, InvalidRequest, UnsafeCheckpoint, quote
from .input_images import load_image
from .manifests import IpAdapterEntry, ModelCatalog, ModelManifest, resolve_uri
from .schema import GenerationRequest
from .settings import Settings

log = logging.getLogger("sd_core.ip_adapter")

FIELD = "ip_adapters"


@dataclass(frozen=True)
class ResolvedIpAdapter:
    """A request's IP-Adapter, fetched: weights file, image encoder folder, its scale and reference images."""

    label: str  # the manifest name
    weights: Path
    encoder: Path
    scale: float
    images: tuple = ()  # PIL images, RGB

    @property
    def key(self) -> tuple[str, str]:
        """What is loaded on a model: the same weights with the same encoder need no reload (scales switch freely)."""
        return (str(self.weights), str(self.encoder))


@dataclass
class _LoadedState:
    """The IP-Adapter loaded on one model (one at a time), its image encoder, and the feature extractor it brought."""

    key: tuple[str, str] | None = None
    encoder: object = None
    feature_extractor: object = None
    created_feature_extractor: bool = False
    scale: float | None = None
    loads: int = 0


class IpAdapterManager:
    """Resolves a request's IP-Adapter (outside the GPU lock) and makes exactly it, or none, active (inside it).

    One adapter per model stays loaded between requests that use it (its scale switched with
    ``set_ip_adapter_scale``); a request without one, or with another, unloads it first (``unload_ip_adapter``
    restores the UNet's plain attention processors, so later plain requests equal a never-loaded model's).
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog):
        self.settings = settings
        self.catalog = catalog
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoadedModel -> _LoadedState

    # --- before the GPU lock ------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, manifest: ModelManifest) -> ResolvedIpAdapter | None:
        """The request's IP-Adapter, fetched and checked, with its images decoded; None when there is none to apply
        (no entries, or scale 0: the request is then exactly the plain one)."""
        specs = request.ip_adapters
        if not specs:
            return None
        entries = [self.find(spec.model, manifest, f"{FIELD}[{i}].model") for i, spec in enumerate(specs)]
        names = list(dict.fromkeys(entry.name for entry in entries))
        if len(names) > 1:
            raise InvalidRequest(f"one IP-Adapter model per request, got {', '.join(names)}; give several images to "
                                 "one of them instead", field=FIELD)
        scales = sorted({spec.scale for spec in specs})
        if len(scales) > 1:
            raise InvalidRequest(f"the images of one IP-Adapter share one scale, got {', '.join(map(str, scales))}",
                                 field=FIELD)
        if scales[0] == 0:
            return None  # skipped entirely: the plain image
        entry = entries[0]
        weights, encoder = self._fetch(entry)
        images = tuple(load_image(spec.image, f"{FIELD}[{i}].image", self.settings).convert("RGB")
                       for i, spec in enumerate(specs))
        return ResolvedIpAdapter(label=entry.name, weights=weights, encoder=encoder, scale=scales[0], images=images)

    def available(self, manifest: ModelManifest) -> list[str]:
        """IP-Adapter names a request for this model may use: its own first, then other same-architecture models'."""
        names = []
        for candidate in [manifest, *(m for m in self.catalog.manifests.values() if m is not manifest)]:
            if candidate.architecture == manifest.architecture:
                names += [entry.name for entry in candidate.ip_adapters if entry.name not in names]
        return names

    def find(self, name: str | None, manifest: ModelManifest, field_name: str = FIELD) -> IpAdapterEntry:
        """A manifest IP-Adapter by name (None: the model's first); refused listing the valid names otherwise."""
        if is_face_id(name):
            raise InvalidRequest(f"{quote(name)}: {FACE_ID_REASON}", field=field_name)
        valid = self.available(manifest)
        if name is None and manifest.ip_adapters:
            return manifest.ip_adapters[0]
        for candidate in [manifest, *(m for m in self.catalog.manifests.values() if m is not manifest)]:
            if candidate.architecture == manifest.architecture:
                for entry in candidate.ip_adapters:
                    if entry.name == name:
                        return entry
        listed = ", ".join(valid) or f"none (model {quote(manifest.name)} has no `ip_adapters` in its manifest)"
        what = f"unknown IP-Adapter {quote(name)}" if name is not None else "no IP-Adapter given"
        raise InvalidRequest(f"{what} for model {quote(manifest.name)}; available: {listed}", field=field_name)

    def _fetch(self, entry: IpAdapterEntry) -> tuple[Path, Path]:
        """The adapter's weights file and its encoder folder (cached, verified); operator files, so a failure is the
        worker's (FetchError), except a file that is no IP-Adapter (refused naming it)."""
        try:
            weights = Path(storage.fetch(resolve_uri(entry.uri, self.settings), self.settings, sha256=entry.sha256,
                                         size=entry.size))
            encoder = Path(storage.fetch(resolve_uri(entry.image_encoder_uri, self.settings), self.settings,
                                         files=entry.image_encoder_files or None))
        except FetchError as exc:
            raise FetchError(f"IP-Adapter {entry.name}: {exc.message}", field=FIELD) from None
        if not weights.is_file() or not is_readable_safetensors(weights):
            raise UnsafeCheckpoint(f"IP-Adapter {entry.name}: not a readable .safetensors file", field=FIELD)
        if not encoder.is_dir():
            raise FetchError(f"IP-Adapter {entry.name}: image_encoder_uri is not a folder", field=FIELD)
        for path in encoder.rglob("*"):
            refuse_pickle(path, self.settings)
        keys = checkpoint_keys(weights)
        if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.") for k in keys):
            raise InvalidRequest(f"IP-Adapter {entry.name}: not an IP-Adapter file (needs `image_proj.*` and "
                                 "`ip_adapter.*` tensors)", field=FIELD)
        if any("lora" in k or "perceiver_resampler" in k for k in keys) or "image_proj.proj.0.weight" in keys and \
                "image_proj.proj.3.weight" not in keys:
            raise InvalidRequest(f"IP-Adapter {entry.name}: {FACE_ID_REASON}", field=FIELD)
        return weights, encoder

    # --- inside the GPU lock ------------------------------------------------------------------------------
    def loaded(self, model) -> tuple[str, str] | None:
        """The key of the adapter loaded on ``model`` (None: none)."""
        state = self._states.get(model)
        return state.key if state else None

    def activate(self, model, pipe, adapter: ResolvedIpAdapter | None) -> None:
        """Make ``adapter`` (at its scale) the one on ``model`` for a call of ``pipe``; None: the plain model.

        Must be called with the engine's GPU lock held. A load that fails leaves the model plain.
        """
        state = self._states.get(model)
        if adapter is None:
            if state is not None and state.key is not None:
                self._unload(model, state)
            return
        state = state or self._states.setdefault(model, _LoadedState())
        if state.key != adapter.key:
            if state.key is not None:
                self._unload(model, state)
            self._load(model, pipe, adapter, state)
        self._attach(pipe, state)
        if state.scale != adapter.scale:
            pipe.set_ip_adapter_scale(adapter.scale)
            state.scale = adapter.scale

    def _load(self, model, pipe, adapter: ResolvedIpAdapter, state: _LoadedState) -> None:
        from transformers import CLIPVisionModelWithProjection

        from .lora import quiet_libraries

        started = time.perf_counter()
        encoder = None
        try:
            with quiet_libraries():
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    str(adapter.encoder), dtype=pipe.dtype, local_files_only=True,
                    use_safetensors=None if self.settings.allow_pickle else True,
                ).to(pipe.device)
                had_feature_extractor = getattr(pipe, "feature_extractor", None) is not None
                pipe.register_modules(image_encoder=encoder)  # load_ip_adapter then loads no encoder of its own
                pipe.load_ip_adapter(str(adapter.weights.parent), subfolder="", weight_name=adapter.weights.name,
                                     image_encoder_folder=None, local_files_only=True)
        except Exception as exc:  # half-loaded (a wrong-sized adapter): back to the plain model, then refuse
            state.encoder = encoder
            self._unload(model, state)
            raise InvalidRequest(f"IP-Adapter {adapter.label} does not fit model {quote(model.name)}: "
                                 f"{_short_reason(exc)}", field=FIELD) from None
        state.key, state.encoder, state.scale = adapter.key, encoder, None
        state.feature_extractor = pipe.feature_extractor
        state.created_feature_extractor = not had_feature_extractor
        state.loads += 1
        log.info("IP-Adapter %s loaded on %s in %.2fs", adapter.label, model.name, time.perf_counter() - started)

    def _attach(self, pipe, state: _LoadedState) -> None:
        """The model's img2img/inpaint views share its UNet but hold their own encoder slots: fill them."""
        if getattr(pipe, "image_encoder", None) is not state.encoder:
            pipe.register_modules(image_encoder=state.encoder)
        if getattr(pipe, "feature_extractor", None) is None:
            pipe.register_modules(feature_extractor=state.feature_extractor)

    def _unload(self, model, state: _LoadedState) -> None:
        """Back to the plain model: UNet attention processors and projection restored, encoders dropped."""
        started = time.perf_counter()
        from .lora import quiet_libraries

        with quiet_libraries():
            model.pipeline("txt2img").unload_ip_adapter()  # the UNet is shared by every mode's pipeline
        for pipe in model.pipes.values():
            if getattr(pipe, "image_encoder", None) is not None:
                pipe.register_modules(image_encoder=None)
            created = state.created_feature_extractor and state.feature_extractor is not None
            if created and getattr(pipe, "feature_extractor", None) is state.feature_extractor:
                pipe.register_modules(feature_extractor=None)
        state.key = state.encoder = state.feature_extractor = state.scale = None
        state.created_feature_extractor = False
        log.info("IP-Adapter unloaded from %s in %.3fs", model.name, time.perf_counter() - started)


def _short_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 240 else text[:237] + "..."
