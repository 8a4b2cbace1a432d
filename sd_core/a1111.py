"""Automatic1111 API payloads (/sdapi/v1/txt2img, /img2img): to GenerationRequest, and results back to A1111's shape."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError

from . import a1111_controlnet, a1111_hires, a1111_inpaint, a1111_listing, a1111_options, a1111_scripts
from .checkpoints import title_to_name
from .errors import InvalidRequest, quote
from .manifests import is_own_vae
from .outputs import infotext_parameters, read_parameters, split_sampler
from .prompt_tags import strip_prompt_tags
from .schedulers import SAMPLERS, SCHEDULES, combine, schedule_label, split_name
from .schema import MAX_CLIP_SKIP, GenerationRequest, GenerationResult, describe_validation_error, field_label

TXT2IMG, IMG2IMG = "txt2img", "img2img"
EXTRAS = "extra-single-image"  # upscale-only: sd_core/upscale_job.py

# Keys of A1111's request bodies, by endpoint (A1111 1.10 and its common forks).
_COMMON = frozenset({
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale",
    "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta",
    "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
    "firstpass_image", "comments", "script_name", "script_args", "send_images", "save_images", "alwayson_scripts",
    "force_task_id", "infotext",
})
_TXT2IMG_ONLY = frozenset({
    "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg",
})
_IMG2IMG_ONLY = frozenset({
    "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur", "mask_round",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "latent_mask", "include_init_images",
})
KNOWN_KEYS = {TXT2IMG: _COMMON | _TXT2IMG_ONLY, IMG2IMG: _COMMON | _IMG2IMG_ONLY}

# A flat payload with any of these keys is read as A1111's (none of them is a GenerationRequest field).
A1111_ONLY_KEYS = (_COMMON | _TXT2IMG_ONLY | _IMG2IMG_ONLY) - set(GenerationRequest.model_fields)

# Features this worker does not have: accepted only when off (absent, null, false, 0, "", [], {}).
UNSUPPORTED = ("styles", "restore_faces", "script_name", "script_args", "include_init_images", "latent_mask")
# Off also at -1: noise drawn at another size (A1111's "resize seed from") is not implemented.
UNSUPPORTED_SIZES = ("seed_resize_from_w", "seed_resize_from_h")
# k-diffusion's noise knobs and A1111's negative-guidance cut-off: accepted at A1111's defaults only (they change the
# image otherwise); s_tmax's default is "none" (None, 0 or infinity). `infotext` (apply a whole infotext) likewise.
SAMPLER_KNOB_DEFAULTS = {"s_churn": (0,), "s_tmin": (0,), "s_tmax": (0, float("inf")), "s_noise": (1,),
                         "s_min_uncond": (0,), "infotext": ("",), "initial_noise_multiplier": (1,)}
# Everything else in KNOWN_KEYS that is not translated below is accepted and has no effect (saving on the server,
# override_settings other than those read here and a1111_options' image options). The inpainting keys and
# resize_mode: sd_core/a1111_inpaint.py. docs/a1111.md gives every key's status; tests/tooling/test_a1111_table.py
# fails when a row stops matching.

A1111_DEFAULT_DENOISING_STRENGTH = 0.75  # A1111's img2img default (GenerationRequest's own is for native requests)
# GenerationRequest field -> the A1111 key it comes from, to name A1111's keys in error messages.
FIELD_NAMES = {
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "scheduler": "sampler_name",
    "num_outputs": "batch_size x n_iter", "strength": "denoising_strength", "image": "init_images",
    "model": "override_settings.sd_model_checkpoint", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "vae": "override_settings.sd_vae",
    **a1111_hires.FIELD_NAMES,
    **a1111_inpaint.FIELD_NAMES,
    "refine": "refiner_checkpoint", "refiner": "refiner_checkpoint", "high_noise_frac": "refiner_switch_at",
    "ip_adapters": "alwayson_scripts.controlnet",
}
CHECKPOINT_KEY = "override_settings.sd_model_checkpoint"
CLIP_SKIP_KEY = "override_settings.CLIP_stop_at_last_layers"
# User text is bounded before it is parsed, and parsed with string methods (no regex that could backtrack).
MAX_CHECKPOINT_CHARS = 300  # a model name (at most 200) + " [hash]" + ".safetensors", with room to spare
MAX_SAMPLER_CHARS = 100  # sampler_name / sampler_index / scheduler: the longest real name has 29 characters
MAX_LISTED = 5  # unknown keys named in one error; the rest are counted


@dataclass
class A1111Call:
    """One A1111 API call: which endpoint, its body, and why the input was read as A1111 (for error hints)."""

    endpoint: str  # txt2img | img2img | extra-single-image | a listing (a1111_listing.LISTINGS)
    payload: dict
    marker: str | None = None  # the A1111-only key that gave a flat payload away; None when named explicitly


def parse_call(data) -> A1111Call | None:
    """Recognise an A1111 payload in a job input; None for a native (GenerationRequest) input.

    Three forms: ``{"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {...}}`` (the convention
    of RunPod's A1111 workers), ``{"api": "txt2img" | "img2img", ...A1111 keys}``, or a flat A1111 body, recognised
    by any key only A1111 has (``sampler_name``, ``cfg_scale``, ``steps``, ``batch_size``, ``init_images``, ...).
    The first two also name a listing (``GET /sdapi/v1/sd-models``, ...: sd_core/a1111_listing.py).
    """
    if not isinstance(data, dict):
        return None
    api = data.get("api")
    if isinstance(api, dict):
        endpoint = _endpoint(api.get("endpoint"), "api.endpoint")
        a1111_listing.check_method(endpoint, api.get("method"))
        extra = sorted(set(data) - {"api", "payload"})
        if extra:
            raise InvalidRequest(f"unknown field next to api/payload: {_listed(extra)}", field="input")
        payload = data.get("payload", {})
        if not isinstance(payload, dict):
            raise InvalidRequest(f"expected a JSON object, got {type(payload).__name__}", field="payload")
        return A1111Call(endpoint, dict(payload))
    if api is not None:
        return A1111Call(_endpoint(api, "api"), {k: v for k, v in data.items() if k != "api"})
    markers = sorted(A1111_ONLY_KEYS & data.keys())
    if markers:
        return A1111Call(IMG2IMG if "init_images" in data else TXT2IMG, dict(data), marker=markers[0])
    return None


def _endpoint(value, field: str) -> str:
    parts = value.strip().rstrip("/").rsplit("/", 2) if isinstance(value, str) and len(value) <= 100 else [""]
    name = parts[-1]
    if len(parts) > 1 and parts[-2] == "controlnet":  # the ControlNet extension's /controlnet/model_list, ...
        name = f"controlnet/{name}"
    a1111_listing.check_endpoint(name, field)
    if name not in (TXT2IMG, IMG2IMG, EXTRAS, *a1111_listing.LISTINGS):
        raise InvalidRequest(f"expected /sdapi/v1/txt2img or /sdapi/v1/img2img (or txt2img, img2img), "
                             f"/sdapi/v1/{EXTRAS}, or a listing ({', '.join(a1111_listing.LISTINGS)}), "
                             f"got {quote(value)}", field=field)
    return name


def _listed(keys: list) -> str:
    shown = ", ".join(field_label(key) for key in keys[:MAX_LISTED])
    return shown + (f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _is_off(value) -> bool:
    return value is None or value is False or value in (0, "", "None") or value == [] or value == {}


def _whole(payload: dict, key: str, errors: list[str]) -> int:
    value = payload.get(key)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.append(f"{key}: must be a whole number of at least 1 (got {quote(value)})")
        return 1
    return value


def _sampler(payload: dict, errors: list[str]) -> str | None:
    """sampler_name (or the older sampler_index) with A1111 1.9+'s separate `scheduler` (schedule type) -> one name.

    As A1111 1.10: no `scheduler` or "Automatic" is the sampler's own default schedule (Karras for DPM++ 2M,
    Exponential for DPM++ 2M SDE, ...) unless the name spells one ("DPM++ 2M Karras"); an explicit schedule applies
    to the sampler; a schedule the sampler cannot run, or one contradicting the name, is refused naming both.
    """
    name = payload.get("sampler_name") or payload.get("sampler_index")
    schedule = payload.get("scheduler")
    bounded = isinstance(schedule, str) and len(schedule) <= MAX_SAMPLER_CHARS
    schedule_name = schedule.strip().lower() if bounded else None
    automatic = _is_off(schedule) or schedule_name == "automatic"
    if not name:
        if not automatic:
            errors.append(f"scheduler: {quote(schedule)} needs a sampler_name to apply to")
        return None
    if not isinstance(name, str) or len(name) > MAX_SAMPLER_CHARS:
        return name  # the schema refuses it, bounded
    try:
        sampler, spelled = split_name(str(name))
    except InvalidRequest:
        return name  # the schema names the unknown sampler
    if automatic:
        chosen = spelled or SAMPLERS[sampler].automatic
    else:
        chosen = schedule_label(schedule) if bounded else None
        if chosen is None:
            errors.append(f"scheduler: {quote(schedule)} (with sampler {sampler!r}) is not a schedule type here; use "
                          f"Automatic, {', '.join(SCHEDULES)}")
            return sampler
        if spelled is not None and spelled != chosen:
            errors.append(f"scheduler: {quote(schedule)} contradicts sampler_name {quote(name)}")
            return sampler
    try:
        return combine(sampler, chosen)
    except InvalidRequest as exc:
        errors.append(str(exc))
        return sampler


def _checkpoint_name(value, errors: list[str], key: str = CHECKPOINT_KEY) -> str | None:
    """A1111's sd_model_checkpoint ("my-model.safetensors [3f1c2a]") -> the manifest name ("my-model")."""
    if not isinstance(value, str):
        return None
    if len(value) > MAX_CHECKPOINT_CHARS:  # refused before any parsing
        errors.append(f"{key}: longer than {MAX_CHECKPOINT_CHARS} characters (got {len(value)})")
        return None
    name = value.strip()
    if "://" in name:  # A1111 names checkpoints it has on disk; a URL model is the native API's (never echoed here)
        errors.append(f"{CHECKPOINT_KEY}: takes a checkpoint name, not a URL; a checkpoint URL goes in the native "
                      "API's `model` (docs/models.md)")
        return None
    return title_to_name(name) or None


def _clip_skip(value, errors: list[str]) -> int | None:
    """A1111's CLIP_stop_at_last_layers (the layer used, counted from the end: 1 = the last) -> layers skipped."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIP_SKIP + 1:
        errors.append(f"{CLIP_SKIP_KEY}: must be a whole number from 1 (no skip) to {MAX_CLIP_SKIP + 1} "
                      f"(got {quote(value)})")
        return None
    return value - 1


def _refiner(p: dict, errors: list[str]) -> dict:
    """refiner_checkpoint + refiner_switch_at -> the expert ensemble (sd_core/refiner.py): the base model runs that
    fraction of the steps, the refiner the rest. A switch at 1 runs no refiner, as in A1111. Without a switch A1111
    hands over at the first step: refused, as the refiner never starts an image here."""
    checkpoint = p.get("refiner_checkpoint")
    if _is_off(checkpoint) or (isinstance(checkpoint, str) and checkpoint.strip().lower() == "none"):
        return {}  # refiner_switch_at alone changes nothing in A1111 either
    found = len(errors)
    name = _checkpoint_name(checkpoint, errors, key="refiner_checkpoint")
    if name is None:
        if len(errors) == found:  # not already refused as too long
            errors.append(f"refiner_checkpoint: expected a checkpoint name (as /sdapi/v1/sd-models lists them), got "
                          f"{quote(checkpoint)}")
        return {}
    if p.get("refiner_switch_at") is None:
        errors.append("refiner_switch_at: required with refiner_checkpoint: the fraction of the steps after which the "
                      "refiner takes over (A1111's default in its UI: 0.8)")
        return {}
    if p["refiner_switch_at"] == 0 and not isinstance(p["refiner_switch_at"], bool):
        errors.append("refiner_switch_at: 0 (the refiner from the first step) is not supported by this worker: the "
                      "base model runs the first steps; use a fraction above 0")
        return {}
    return {"refine": "expert_ensemble_refiner", "refiner": name, "high_noise_frac": p["refiner_switch_at"]}


def to_request(call: A1111Call) -> GenerationRequest:
    """Translate an A1111 body into a GenerationRequest; InvalidRequest names A1111's keys (``steps: ...``)."""
    if call.endpoint not in KNOWN_KEYS:  # a listing: a1111_listing.answer serves it
        raise InvalidRequest(f"/sdapi/v1/{call.endpoint} lists, it generates nothing", field="api.endpoint")
    p = {k: v for k, v in call.payload.items() if v is not None}
    errors: list[str] = []
    hint = f" (the input was read as an A1111 {call.endpoint} payload because of {call.marker!r})"
    hint = hint if call.marker else ""
    unknown = sorted(set(p) - KNOWN_KEYS[call.endpoint])
    for key in unknown[:MAX_LISTED]:
        if call.endpoint == TXT2IMG and key in ("init_images", "mask"):
            errors.append(f"{key}: only for /sdapi/v1/img2img")
        else:
            errors.append(f"{field_label(key)}: unknown field for /sdapi/v1/{call.endpoint}{hint}")
    if len(unknown) > MAX_LISTED:
        errors.append(f"input: {len(unknown) - MAX_LISTED} more unknown fields")
    for key in UNSUPPORTED:
        if not _is_off(p.get(key)):
            errors.append(f"{key}: not supported by this worker")
    errors.extend(a1111_scripts.refusals(p.get("alwayson_scripts")))
    controlnets = a1111_controlnet.units(p.get("alwayson_scripts"), errors)
    ip_adapters, unit_errors = a1111_scripts.ip_adapter_specs(p.get("alwayson_scripts"))
    errors.extend(unit_errors)
    for key in UNSUPPORTED_SIZES:
        if not _is_off(p.get(key)) and p.get(key) != -1:
            errors.append(f"{key}: not supported by this worker (only -1 or 0, off)")
    for key, defaults in SAMPLER_KNOB_DEFAULTS.items():
        value = p.get(key)
        if value is not None and (isinstance(value, bool) or value not in defaults):
            allowed = " or ".join(quote(d) for d in defaults)
            errors.append(f"{key}: only A1111's default ({allowed}) is supported by this worker, got {quote(value)}")
    fields: dict = {}
    for source, target in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("seed", "seed"),
                           ("width", "width"), ("height", "height"), ("steps", "num_inference_steps"),
                           ("cfg_scale", "guidance_scale"), ("subseed", "subseed"),
                           ("subseed_strength", "subseed_strength"), ("eta", "eta"), ("tiling", "tiling")):
        if source in p:
            fields[target] = p[source]
    if p.get("disable_extra_networks") is True and isinstance(fields.get("prompt"), str):
        fields["prompt"] = strip_prompt_tags(fields["prompt"])  # as A1111: the tags are removed, not applied
    sampler = _sampler(p, errors)
    if sampler is not None:
        fields["scheduler"] = sampler
    fields["num_outputs"] = _whole(p, "batch_size", errors) * _whole(p, "n_iter", errors)
    if controlnets:
        fields["controlnets"] = controlnets
    overrides = p.get("override_settings") or {}
    if not isinstance(overrides, dict):
        errors.append("override_settings: expected a JSON object")
    else:
        if (model := _checkpoint_name(overrides.get("sd_model_checkpoint"), errors)) is not None:
            fields["model"] = model
        if (clip_skip := _clip_skip(overrides.get("CLIP_stop_at_last_layers"), errors)) is not None:
            fields["clip_skip"] = clip_skip
        vae = overrides.get("sd_vae")
        if vae is not None and not isinstance(vae, str):
            errors.append(f"override_settings.sd_vae: expected a VAE name, Automatic or None (got {quote(vae)})")
        elif vae is not None and not is_own_vae(vae):  # Automatic, None: the model's own (sd_core/vae.py)
            fields["vae"] = vae
        a1111_options.check_image_options(overrides, errors)
    if call.endpoint == TXT2IMG and (hires := a1111_hires.hires_spec(p, errors, _sampler)) is not None:
        fields["hires"] = hires  # enable_hr and the hr_* keys (txt2img's denoising_strength is the second pass's)
    fields.update(_refiner(p, errors))
    if call.endpoint == IMG2IMG:
        images = p.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            count = len(images) if isinstance(images, list) else "no list"
            errors.append(f"init_images: expected a list with exactly one image (base64, data URI or URL), "
                          f"got {count}")
        else:
            fields["image"] = images[0]
        if "mask" in p:
            fields["mask"] = p["mask"]
        fields.update(a1111_inpaint.inpaint_fields(p, errors))
        fields["strength"] = p.get("denoising_strength", A1111_DEFAULT_DENOISING_STRENGTH)
    if ip_adapters:  # ControlNet's IP-Adapter units
        fields["ip_adapters"] = ip_adapters
    if errors:
        raise InvalidRequest("; ".join(errors))
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        # cross-field messages (no location) start with our field names: A1111's keys instead
        raise InvalidRequest(rename_fields(describe_validation_error(exc, FIELD_NAMES))) from None


def rename_fields(message: str) -> str:
    """An sd_core error message (``"num_inference_steps: ..."``) with A1111's key names (``"steps: ..."``)."""
    parts = []
    for part in message.split("; "):
        name, sep, rest = part.partition(": ")
        # `scheduler` is also A1111's own key (the noise schedule): a message about it is already in A1111's terms.
        rename = sep and name in FIELD_NAMES and name != "scheduler"
        parts.append(f"{FIELD_NAMES[name]}{sep}{rest}" if rename else part)
    return "; ".join(parts)


def to_response(call: A1111Call, result: GenerationResult, images: list[str]) -> dict:
    """A1111's response body: ``images`` (base64 PNGs, or URLs when the worker uploads to a bucket), ``parameters``
    (the request with the values used filled in) and ``info`` (a JSON string: seeds, sizes, infotexts, ...).

    The values used come from ``result.request``: the request with the model's defaults filled in.
    """
    effective = result.request
    if effective is None:
        raise ValueError("to_response needs the result's effective request (GenerationResult.request)")
    first = result.images[0]
    batch_size = call.payload.get("batch_size") or 1
    n_iter = call.payload.get("n_iter") or 1
    strength = effective.strength if call.endpoint == IMG2IMG else None
    # A hires fix: A1111 reports the first pass's size (its images are larger) and the second pass's strength.
    width, height = (effective.width, effective.height) if effective.hires else (first.width, first.height)
    if effective.hires is not None:
        strength = effective.hires.denoising_strength
    parameters = dict(call.payload)
    parameters.update(
        prompt=effective.prompt, negative_prompt=effective.negative_prompt, seed=call.payload.get("seed", -1),
        steps=effective.num_inference_steps, cfg_scale=effective.guidance_scale, sampler_name=effective.scheduler,
        width=width, height=height, batch_size=batch_size, n_iter=n_iter,
    )
    if call.endpoint == IMG2IMG:
        parameters.update(init_images=None, mask=None, denoising_strength=strength)  # as A1111: no echo of images
    infotexts = [read_parameters(image.data) or result.parameters for image in result.images]
    written = infotext_parameters(infotexts[0])  # what the engine wrote: hashes, schedule, as A1111 reports them
    sampler, schedule = written.get("Sampler"), written.get("Schedule type")
    if not sampler and effective.scheduler:
        sampler, schedule = split_sampler(effective.scheduler)
    switch_at = written.get("Refiner switch at")
    # A1111 lists the schedule only when it is not Automatic, the refiner only when it ran
    extra = {"Schedule type": schedule if schedule != "Automatic" else None, "Denoising strength": strength,
             **{key: value for key, value in written.items() if key.startswith("Hires ")},
             "Lora hashes": written.get("Lora hashes"), "TI hashes": written.get("TI hashes"),
             "Refiner": written.get("Refiner"), "Refiner switch at": float(switch_at) if switch_at else None}
    # (A1111 lists the schedule only when it is not Automatic)
    model_hash = written.get("Model hash")
    count = len(result.images)
    subseeds = result.subseeds or [-1] * count  # the variation seeds used (A1111 reports them for every image)
    info = {
        "prompt": effective.prompt, "all_prompts": [effective.prompt] * count,
        "negative_prompt": effective.negative_prompt, "all_negative_prompts": [effective.negative_prompt] * count,
        "seed": result.seed, "all_seeds": result.seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": effective.subseed_strength, "width": width, "height": height,
        "sampler_name": sampler,
        "cfg_scale": effective.guidance_scale, "steps": effective.num_inference_steps, "batch_size": batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": result.model,
        "sd_model_hash": model_hash, "sd_vae_name": written.get("VAE"), "sd_vae_hash": written.get("VAE hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": strength,
        "extra_generation_params": {key: value for key, value in extra.items() if value is not None},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": effective.clip_skip + 1,  # A1111's CLIP_stop_at_last_layers: 1 = no layer skipped
        "is_using_inpainting_conditioning": False, "n_iter": n_iter, "version": "sd-serverless",
        "nsfw": [image.nsfw for image in result.images],  # per image: flagged (and blacked out) by the safety checker
    }
    send = call.payload.get("send_images", True)
    return {"images": images if send is not False else [], "parameters": parameters, "info": json.dumps(info)}
