"""A1111's read-only API endpoints (/sdapi/v1/sd-models, samplers, ...) answered from the model catalog, no GPU."""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequest, quote, scrub
from .schedulers import KARRAS, NORMAL, SAMPLER_ALIASES, SAMPLERS, SCHEDULES, UNIFORM

# Endpoint name -> what it lists. Each answer has the shape of A1111 1.10's response model for it.
LISTINGS = ("sd-models", "samplers", "schedulers", "loras", "embeddings", "sd-vae", "options", "upscalers",
            "controlnet/model_list", "controlnet/module_list")  # the last two: the ControlNet extension's, /controlnet/
# A1111 endpoints whose job RunPod itself does for every job: refused with a pointer to RunPod's own.
PLATFORM_ENDPOINTS = {"progress": "RunPod's /status/<job id> (and the job's progress updates)",
                      "interrupt": "RunPod's /cancel/<job id>", "skip": "RunPod's /cancel/<job id>"}
MAX_LORA_PATH_CHARS = 300


def check_endpoint(name: str, field: str) -> None:
    """Refuse A1111's /progress and /interrupt (any method): RunPod's /status and /cancel do their job."""
    if name in PLATFORM_ENDPOINTS:
        raise InvalidRequest(f"/sdapi/v1/{name} is not served by this worker; use {PLATFORM_ENDPOINTS[name]}",
                             field=field)


def path(endpoint: str) -> str:
    """An endpoint's URL path as A1111 serves it."""
    return f"/{endpoint}" if endpoint.startswith("controlnet/") else f"/sdapi/v1/{endpoint}"


def check_method(endpoint: str, method) -> None:
    """A listing takes GET, a generation POST (an absent method is the endpoint's own)."""
    expected = "GET" if endpoint in LISTINGS else "POST"
    if method is None or (isinstance(method, str) and method.strip().upper() == expected):
        return
    why = "; options are read-only here (per job: override_settings)" if endpoint == "options" else ""
    raise InvalidRequest(f"only {expected} is served for {path(endpoint)} (got {quote(method)}){why}",
                         field="api.method")


def answer(endpoint: str, payload: dict, engine) -> list | dict:
    """The listing ``endpoint`` for a worker's ``engine`` (its catalog and settings): A1111's response body."""
    if payload:
        raise InvalidRequest(f"{path(endpoint)} takes no payload (got {len(payload)} field(s))", field="payload")
    manifests = list(engine.catalog.manifests.values())
    if endpoint == "sd-models":
        return [_model_item(manifest) for manifest in manifests]
    if endpoint == "samplers":
        return [_sampler_item(name) for name in SAMPLERS]
    if endpoint == "schedulers":
        return [_scheduler_item(label) for label in ("Automatic", *SCHEDULES)]
    if endpoint == "loras":
        seen: dict[str, dict] = {}
        for manifest in manifests:
            for lora in manifest.loras:  # a name several manifests share is listed once (the first)
                seen.setdefault(lora.name, {"name": lora.name, "alias": lora.name,
                                            "path": scrub(lora.uri)[:MAX_LORA_PATH_CHARS], "metadata": {}})
        return list(seen.values())
    if endpoint == "sd-vae":  # A1111's VAE names are file names; sd_vae takes the manifest name with or without
        seen = {}  # ".safetensors". A name several manifests share is listed once (the first).
        for manifest in manifests:
            for vae in manifest.vaes:
                seen.setdefault(vae.name, {"model_name": vae.name,
                                           "filename": scrub(vae.uri)[:MAX_LORA_PATH_CHARS]})
        return list(seen.values())
    if endpoint == "embeddings":
        loaded: dict[str, dict] = {}
        for manifest in manifests:
            for entry in manifest.embeddings:  # a name several manifests share is listed once (the first)
                if entry.name not in loaded:
                    loaded[entry.name] = _embedding_item(entry, engine.settings)
        return {"loaded": loaded, "skipped": {}}
    if endpoint == "options":
        default = engine.catalog.manifests.get(engine.settings.default_model)
        return {"sd_model_checkpoint": _title(default) if default else engine.settings.default_model,
                "sd_checkpoint_hash": default.sha256 if default else None, "CLIP_stop_at_last_layers": 1,
                "sd_vae": "Automatic", "samples_format": "png"}
    if endpoint == "controlnet/model_list":  # names as requests give them (no A1111 hash suffix needed)
        return {"model_list": list(dict.fromkeys(e.name for m in manifests for e in m.controlnets))}
    if endpoint == "controlnet/module_list":
        return {"module_list": engine.controlnets.preprocessors.names()}
    if endpoint == "upscalers":
        return [_upscaler_item(name, engine.upscalers) for name in engine.upscalers.names()]
    return []


def _title(manifest) -> str:
    """As A1111's checkpoint title, ``name [short hash]``: sent back as override_settings.sd_model_checkpoint."""
    return f"{manifest.name} [{manifest.sha256[:10]}]" if manifest.sha256 else manifest.name


def _model_item(manifest) -> dict:
    return {"title": _title(manifest), "model_name": manifest.name,
            "hash": manifest.sha256[:10] if manifest.sha256 else None, "sha256": manifest.sha256,
            "filename": scrub(manifest.uri)[:MAX_LORA_PATH_CHARS], "config": None}


def _embedding_item(entry, settings) -> dict:
    """A1111's embedding entry: vectors and width from a local file's header, else from the manifest (or null)."""
    from .embeddings import embedding_header
    from .manifests import resolve_uri

    uri = resolve_uri(entry.uri, settings)
    header = embedding_header(Path(uri)) if "://" not in uri and Path(uri).is_file() else None
    vectors, shape = header if header else (entry.vectors, entry.shape)
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape, "vectors": vectors}


def _sampler_item(name: str) -> dict:
    aliases = [alias for alias, target in SAMPLER_ALIASES.items() if target == name]
    automatic = SAMPLERS[name].automatic
    options = {"scheduler": automatic.lower()} if automatic != UNIFORM else {}  # A1111's default schedule
    return {"name": name, "aliases": aliases, "options": options}


def _scheduler_item(label: str) -> dict:
    return {"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
            "default_rho": 7.0 if label == KARRAS else -1.0,
            "need_inner_model": label in (UNIFORM, NORMAL)}


def _upscaler_item(name: str, upscalers) -> dict:
    """A1111's UpscalerItem. The weights' location is not a download link here: model_url stays null."""
    entry = upscalers.entries.get(name)
    path = scrub(entry.uri)[:MAX_LORA_PATH_CHARS] if entry is not None else None
    return {"name": name, "model_name": name if entry is not None else None, "model_path": path, "model_url": None,
            "scale": entry.scale if entry is not None else 4}
