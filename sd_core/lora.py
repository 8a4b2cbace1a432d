"""LoRAs: resolving and fetching LoRA files (request field and prompt tags), hot-swapping adapters on pipelines."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import storage
from .checkpoints import PICKLE_SUFFIXES, is_readable_safetensors
from .device import free_memory, is_out_of_memory
from .errors import Cancelled, FetchError, InvalidRequest, ModelNotFound, OutOfMemory, quote
from .lora_links import direct_lora_url
from .manifests import ModelCatalog, ModelManifest, resolve_uri
from .prompt_tags import lora_label, parse_prompt_tags
from .schema import MAX_LORAS, GenerationRequest, LoraSpec
from .settings import Settings
from .user_urls import check_lora_source, redact_url

log = logging.getLogger("sd_core.lora")

FIELD = "loras"
DENOISERS = ("unet", "transformer")  # the components a LoRA's scale applies to; text encoders get text_encoder_scale


@dataclass(frozen=True)
class ResolvedLora:
    """One requested LoRA, fetched: the local file, its content hash (which names its adapter) and its scales."""

    label: str  # manifest name or file name: shown in infotext and errors
    source: str  # redacted source, for errors
    path: Path
    sha256: str
    unet_scale: float
    text_encoder_scale: float

    @property
    def adapter(self) -> str:
        # Named by content: the same file under two URIs is one adapter; a changed file is a new one.
        return "lora_" + self.sha256[:24]

    @property
    def key(self) -> tuple[str, float, float]:
        return (self.adapter, self.unet_scale, self.text_encoder_scale)


# --------------------------------------------------------------------------------------------------------------
# Adapters on a loaded model
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _AdapterState:
    """LoRA state of one loaded model: adapters in memory (LRU order), the active set, and fusing."""

    loaded: OrderedDict[str, ResolvedLora] = field(default_factory=OrderedDict)
    active: tuple[tuple[str, float, float], ...] = ()
    enabled: bool = True  # LoRA layers switched on (disable_lora() after a request without LoRAs)
    fused: bool = False
    fused_backup: dict[tuple[str, str], dict[str, object]] = field(default_factory=dict)
    streak: int = 0  # consecutive activations of `active`


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers/transformers/peft log page-long reports while loading adapters; our own messages replace them."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers_logger = logging.getLogger("diffusers")
    old_disabled = diffusers_logger.disabled
    diffusers_logger.disabled = True  # failed loads are logged at ERROR, with every mismatched tensor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logger.disabled = old_disabled
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _components(pipe) -> list[tuple[str, object]]:
    import torch

    found = []
    for name in getattr(pipe, "_lora_loadable_modules", ()):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            found.append((name, module))
    return found


def _adapters_by_component(pipe) -> dict[str, list[str]]:
    return {name: list(getattr(module, "peft_config", {}) or {}) for name, module in _components(pipe)}


def _remove_adapter(pipe, adapter: str) -> None:
    """Delete an adapter from every component that has it (also a half-loaded one: UNet done, text encoder not)."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    for _component, module in _components(pipe):
        if adapter in (getattr(module, "peft_config", None) or {}):
            delete_adapter_layers(module, adapter)
        else:  # layers injected before a failure may exist without a config entry
            from peft.tuners.tuners_utils import BaseTunerLayer

            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer) and adapter in _layer_adapters(layer):
                    layer.delete_adapter(adapter)


def _layer_adapters(layer) -> set[str]:
    names: set[str] = set()
    for attribute in ("lora_A", "lora_embedding_A"):
        names.update(getattr(layer, attribute, {}) or {})
    return names


def _tuner_layers(pipe) -> Iterator[tuple[tuple[str, str], object]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, module in _components(pipe):
        for name, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                yield (component, name), layer


class LoraManager:
    """Resolves the LoRAs of requests (outside the GPU lock) and activates exactly them on a model (inside it).

    Adapters stay loaded per model, at most SD_LORA_MAX_LOADED of them (least recently used out first); switching
    LoRA sets is ``set_adapters`` with per-component weights, never a reload of the base model.
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog):
        self.settings = settings
        self.catalog = catalog
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoadedModel -> _AdapterState

    # --- before the GPU lock ------------------------------------------------------------------------------
    def prepare(
        self, request: GenerationRequest, manifest: ModelManifest
    ) -> tuple[GenerationRequest, tuple[ResolvedLora, ...]]:
        """Strip prompt tags, merge them with ``request.loras``, and fetch every LoRA file (verified, cached)."""
        prompt, tagged = parse_prompt_tags(request.prompt)
        if tagged:
            request = request.model_copy(update={"prompt": prompt})
        return request, self.resolve_all([*request.loras, *tagged], manifest)

    def resolve_all(self, specs: list[LoraSpec], manifest: ModelManifest) -> tuple[ResolvedLora, ...]:
        """Resolve and fetch the LoRAs of one request (field first, then prompt tags); each at most once."""
        if not specs:
            return ()
        if len(specs) > MAX_LORAS:
            raise InvalidRequest(
                f"{len(specs)} LoRAs requested (field and prompt tags together); at most {MAX_LORAS}", field=FIELD
            )
        resolved = [self.resolve(spec, manifest) for spec in specs]
        seen: dict[str, str] = {}
        for item in resolved:
            if item.adapter in seen:
                raise InvalidRequest(f"{item.label}: the same LoRA is requested twice (also as {seen[item.adapter]})",
                                     field=FIELD)
            seen[item.adapter] = item.label
        return tuple(resolved)

    def resolve(self, spec: LoraSpec, manifest: ModelManifest) -> ResolvedLora:
        """Find, fetch and hash one LoRA: a manifest LoRA name, or a URL (https://, s3://, a pasted Hugging Face or
        Civitai link: sd_core/lora_links.py) under the user-URL policy.

        Local paths and relative bucket keys come only through manifests (operator-controlled), never requests.
        """
        # A pasted Hugging Face / Civitai page link -> its download URL first: the policy checks the rewritten URL.
        source = direct_lora_url(spec.source.strip(), self.settings, field=FIELD)
        checked = check_lora_source(source, field=FIELD, settings=self.settings)
        if isinstance(checked, str):
            entry = self.catalog.find_lora(checked, manifest)
            if entry is None:
                known = sorted({lora.name for m in self.catalog.manifests.values()
                                if m.architecture == manifest.architecture for lora in m.loras})
                raise ModelNotFound(
                    f"unknown LoRA {quote(checked)} for {manifest.name} ({manifest.architecture}); "
                    f"available: {', '.join(known) or 'none'}; or give an https:// or s3:// URL",
                    field=FIELD,
                )
            uri, sha256, size = resolve_uri(entry.uri, self.settings), entry.sha256, entry.size
            label = shown = entry.name
            unet = spec.scale if "scale" in spec.model_fields_set else entry.scale
        else:
            uri, sha256, size = checked.url, None, None
            label, shown, unet = lora_label(checked.url), redact_url(checked.url), spec.scale
        te = unet if spec.text_encoder_scale is None else spec.text_encoder_scale
        path, digest = fetch_weights(self.settings, uri, sha256, size, shown, user_given=not isinstance(checked, str),
                                     field=FIELD, what="LoRA")
        return ResolvedLora(label=label, source=shown, path=path, sha256=digest, unet_scale=unet,
                            text_encoder_scale=te)

    @staticmethod
    def _pickle_message(shown: str) -> str:
        return pickle_message(shown, "LoRA")

    # --- inside the GPU lock ------------------------------------------------------------------------------
    def loaded(self, model) -> list[str]:
        """Labels of the adapters held in memory for ``model``, least recently used first."""
        state = self._states.get(model)
        return [lora.label for lora in state.loaded.values()] if state else []

    def activate(self, model, loras: tuple[ResolvedLora, ...], should_cancel: Callable[[], bool] | None = None) -> None:
        """Make exactly ``loras`` (with their scales) active on ``model``; none -> the plain base model.

        Must be called with the engine's GPU lock held. Any failure (a LoRA that does not fit this architecture,
        out of memory, cancellation) removes what it half-loaded and leaves the previous active set in place.
        """
        state = self._states.get(model)
        if state is None:
            if not loras:
                return  # never had an adapter: nothing to switch off
            state = self._states.setdefault(model, _AdapterState())
        pipe = model.pipeline("txt2img")
        wanted = tuple(lora.key for lora in loras)
        if state.fused and state.active == wanted:
            return
        if state.fused:
            self._unfuse(pipe, state)
        previous, loaded_any = state.active, False
        try:
            with quiet_libraries():
                for lora in loras:
                    if lora.adapter in state.loaded:
                        state.loaded.move_to_end(lora.adapter)
                        continue
                    self._make_room(pipe, state, keep={item.adapter for item in loras})
                    # Loading changes which adapters are active and wraps new layers enabled: re-apply after it.
                    loaded_any, state.enabled = True, False
                    self._load(pipe, model.manifest, lora)
                    state.loaded[lora.adapter] = lora
                    if should_cancel is not None and should_cancel():
                        raise Cancelled("generation cancelled")
                if loaded_any or wanted != state.active:
                    self._apply(pipe, state, wanted)
        except BaseException as exc:
            try:
                with quiet_libraries():
                    self._apply(pipe, state, tuple(k for k in previous if k[0] in state.loaded))
            except Exception:  # keep the original error; the next request applies its own set anyway
                log.exception("could not restore the previous LoRA set of %s", model.name)
                state.active, state.enabled = ("unknown",), False
            if _is_oom(exc):
                free_memory(model.placement)
                raise OutOfMemory("ran out of memory loading LoRAs; try fewer LoRAs", field=FIELD) from None
            raise
        state.streak = state.streak + 1 if wanted and wanted == previous else 1
        fuse_after = self.settings.lora_fuse_after
        if wanted and fuse_after and state.streak >= fuse_after:
            self._fuse(pipe, state, [key[0] for key in wanted])

    def _load(self, pipe, manifest: ModelManifest, lora: ResolvedLora) -> None:
        started = time.perf_counter()
        try:
            if is_readable_safetensors(lora.path):  # by path, so diffusers also reads the file's adapter metadata
                source = str(lora.path)
            elif self.settings.allow_pickle:  # resolve() refused it otherwise
                import torch

                with open(lora.path, "rb") as handle:  # a file object: torch.load goes by suffix for a path
                    source = torch.load(handle, map_location="cpu", weights_only=True)
            else:
                raise InvalidRequest(self._pickle_message(lora.source), field=FIELD)
            pipe.load_lora_weights(source, adapter_name=lora.adapter, local_files_only=True, use_safetensors=True)
        except BaseException as exc:
            _remove_adapter(pipe, lora.adapter)
            if isinstance(exc, Exception) and not isinstance(exc, InvalidRequest) and not _is_oom(exc):
                raise InvalidRequest(
                    f"{lora.source}: does not fit {manifest.name} ({manifest.architecture}); is it a LoRA for "
                    f"another base model? ({_short_reason(exc)})", field=FIELD,
                ) from None
            raise
        if not any(lora.adapter in names for names in _adapters_by_component(pipe).values()):
            _remove_adapter(pipe, lora.adapter)
            raise InvalidRequest(
                f"{lora.source}: holds no LoRA weights that {manifest.name} ({manifest.architecture}) can use",
                field=FIELD,
            )
        log.info("LoRA %s loaded as %s in %.2fs", lora.source, lora.adapter, time.perf_counter() - started)

    def _make_room(self, pipe, state: _AdapterState, keep: set[str]) -> None:
        limit = max(1, self.settings.lora_max_loaded)
        for adapter in list(state.loaded):
            if len(state.loaded) < limit:
                break
            if adapter in keep:
                continue
            log.info("LoRA %s unloaded (SD_LORA_MAX_LOADED=%d)", state.loaded[adapter].source, limit)
            _remove_adapter(pipe, adapter)
            del state.loaded[adapter]
            state.active = tuple(k for k in state.active if k[0] != adapter)

    def _apply(self, pipe, state: _AdapterState, wanted: tuple[tuple[str, float, float], ...]) -> None:
        if wanted:
            by_component = _adapters_by_component(pipe)
            names, weights = [], []
            for adapter, unet, te in wanted:
                names.append(adapter)
                weights.append({component: unet if component in DENOISERS else te
                                for component, adapters in by_component.items() if adapter in adapters})
            pipe.set_adapters(names, weights)
            if not state.enabled:  # enable_lora walks every module: as costly as set_adapters, so only when needed
                pipe.enable_lora()
                state.enabled = True
        elif any(_adapters_by_component(pipe).values()):
            pipe.disable_lora()
            state.enabled = False
        state.active = wanted

    # --- fusing ---------------------------------------------------------------------------------------------
    def _fuse(self, pipe, state: _AdapterState, adapters: list[str]) -> None:
        """Merge the active set into the base weights (faster steps). The touched base weights are copied first,
        so unfusing restores them bit for bit instead of subtracting (which drifts, badly in fp16)."""
        started = time.perf_counter()
        wanted = set(adapters)
        backup = {}
        for key, layer in _tuner_layers(pipe):
            if _layer_adapters(layer) & wanted:
                base = layer.get_base_layer()
                backup[key] = {name: tensor.detach().to("cpu", copy=True)
                               for name, tensor in (("weight", base.weight), ("bias", getattr(base, "bias", None)))
                               if tensor is not None}
        with quiet_libraries():
            pipe.fuse_lora(components=[name for name, _ in _components(pipe)], adapter_names=adapters)
        state.fused, state.fused_backup = True, backup
        log.info("LoRA set fused into the base weights in %.2fs", time.perf_counter() - started)

    def _unfuse(self, pipe, state: _AdapterState) -> None:
        with quiet_libraries():
            pipe.unfuse_lora(components=[name for name, _ in _components(pipe)])
        layers = dict(_tuner_layers(pipe))
        for key, saved in state.fused_backup.items():
            base = layers[key].get_base_layer()
            for name, tensor in saved.items():
                getattr(base, name).data.copy_(tensor)
        state.fused, state.fused_backup, state.streak = False, {}, 0


def pickle_message(shown: str, what: str) -> str:
    """Why a pickle weights file (LoRA, embedding) is refused, and what to do instead."""
    return (f"{shown}: not a .safetensors file; pickle {what}s (.ckpt/.pt/.bin) can execute code when loaded and "
            "are refused (convert it to .safetensors, or set SD_ALLOW_PICKLE=1 if you trust the file)")


def fetch_weights(settings: Settings, uri: str, sha256: str | None, size: int | None, shown: str, *, user_given: bool,
                  field: str, what: str) -> tuple[Path, str]:
    """Fetch one adapter file (a LoRA, an embedding) through the weights cache: pickle refused (by suffix before the
    download, by content after it) unless SD_ALLOW_PICKLE; returns the local file and its sha256."""
    suffix = Path(urlsplit(uri).path if "://" in uri else uri).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not settings.allow_pickle:
        raise InvalidRequest(pickle_message(shown, what), field=field)
    started = time.perf_counter()
    try:
        path = storage.fetch(uri, settings, sha256=sha256, size=size, user_url=user_given)
    except (FetchError, InvalidRequest) as exc:  # InvalidRequest: the URL policy refused a redirect or a size
        message = f"{what} {shown}: {exc.message}"  # SDError messages are scrubbed of URL secrets already
        if user_given:  # the request named something we cannot get: the caller can fix it
            raise InvalidRequest(message, field=field) from None
        raise type(exc)(message, field=field) from None
    path = Path(path)
    if path.is_dir():
        raise InvalidRequest(f"{shown}: is a folder; name the {what} .safetensors file itself", field=field)
    log.debug("%s %s ready at %s in %.2fs", what, shown, path, time.perf_counter() - started)
    if not settings.allow_pickle and not is_readable_safetensors(path):
        raise InvalidRequest(pickle_message(shown, what), field=field)
    return path, sha256 or storage.file_sha256(path)  # the hash is remembered per (path, size, mtime)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and is_out_of_memory(exc)


def _short_reason(exc: BaseException) -> str:
    """The first informative line of a loader error, cut to a readable length."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "mismatch" in line or "not found" in line), lines[0] if lines else "")
    detail = re.sub(r"\.lora_[AB]\.[^.\s]+\.weight", "", detail)  # our internal adapter name is noise here
    text = f"{type(exc).__name__}: {detail}"
    return text if len(text) <= 240 else text[:237] + "..."
