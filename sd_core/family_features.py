"""Requests checked against their model family's features (``ModelFamily.features``): what a family lacks is refused
clearly, naming the field, the model and its family, before anything is fetched or loaded."""

from __future__ import annotations

from .errors import InvalidRequest, quote
from .families.base import (
    CONTROLNET,
    EMBEDDINGS,
    EXPLICIT_SIGMAS,
    HIRES,
    IP_ADAPTER,
    LATENT_FILL,
    LATENT_RESIZE,
    MAX_SEQUENCE_LENGTH,
    NEGATIVE_PROMPT,
    PROMPT_SYNTAX,
    TILING,
    VAE_OVERRIDE,
    VARIATION_SEEDS,
)
from .manifests import ModelManifest, is_own_vae
from .prompt_syntax import has_syntax, parse_prompt
from .schema import GenerationRequest

# Why a family may lack a feature, for the error message: {feature: (field, what it is)}
_WHAT = {
    NEGATIVE_PROMPT: ("negative_prompt", "takes no negative prompt (its guidance is distilled: no classifier-free "
                                         "guidance); leave it empty"),
    VARIATION_SEEDS: ("subseed_strength", "has no variation seeds here; use subseed_strength 0"),
    HIRES: ("hires", "has no hires fix here; generate at the final size, or upscale the image afterwards"),
    TILING: ("tiling", "has no seamless tiling here"),
    EMBEDDINGS: ("embeddings", "takes no textual-inversion embeddings (A1111 files are made for SD's CLIP "
                               "encoders)"),
    CONTROLNET: ("controlnets", "has no ControlNet here"),
    IP_ADAPTER: ("ip_adapters", "has no IP-Adapter here"),
    VAE_OVERRIDE: ("vae", "has no alternate VAE here; leave vae empty"),
    LATENT_FILL: ("inpaint_fill", "has no latent noise / latent nothing fill here; use original or fill"),
    LATENT_RESIZE: ("resize_mode", "has no latent resize here (A1111's is for 4-channel SD latents); use resize, "
                                   "crop or fill"),
    MAX_SEQUENCE_LENGTH: ("max_sequence_length", "has no T5 text encoder; leave max_sequence_length empty"),
    EXPLICIT_SIGMAS: ("sigmas", "takes no explicit sigmas here; leave sigmas empty and pick a schedule with "
                                "scheduler"),
}


def _uses(req: GenerationRequest) -> list[str]:
    """The features ``req`` asks for (prompt syntax is checked on its own: plain text written with escapes is fine)."""
    used = []
    if req.negative_prompt.strip():
        used.append(NEGATIVE_PROMPT)
    if req.subseed_strength > 0:
        used.append(VARIATION_SEEDS)
    if req.hires is not None:
        used.append(HIRES)
    if req.tiling:
        used.append(TILING)
    if req.embeddings:
        used.append(EMBEDDINGS)
    if req.controlnets:
        used.append(CONTROLNET)
    if req.ip_adapters:
        used.append(IP_ADAPTER)
    if not is_own_vae(req.vae):
        used.append(VAE_OVERRIDE)
    if req.image is not None and req.inpaint_fill in ("latent_noise", "latent_nothing"):
        used.append(LATENT_FILL)
    if req.image is not None and req.resize_mode == "latent":
        used.append(LATENT_RESIZE)
    if req.max_sequence_length is not None:
        used.append(MAX_SEQUENCE_LENGTH)
    if req.sigmas is not None:
        used.append(EXPLICIT_SIGMAS)
    return used


def check_request(req: GenerationRequest, manifest: ModelManifest) -> GenerationRequest:
    """``req`` with its prompt as plain text where the family takes no A1111 syntax; InvalidRequest ("<field>: <model>
    is a <family> model, which ...") for a mode it does not run, or the first feature it asks of a family lacking it."""
    family = manifest.family
    if req.mode not in family.modes:  # FLUX.1 Fill: inpaint (and outpaint) only
        hint = "; give an image and a mask, or outpaint" if family.modes == ("inpaint",) else ""
        raise InvalidRequest(f"{quote(manifest.name)} is a {family.name} model, which runs "
                             f"{' and '.join(family.modes)} requests only, not {req.mode}{hint}",
                             field="mask" if req.mode == "img2img" else "image")
    for feature in _uses(req):
        if not family.supports(feature):
            field, why = _WHAT[feature]
            raise InvalidRequest(f"{quote(manifest.name)} is a {family.name} model, which {why}", field=field)
    if req.sigmas is not None:
        family.check_sigmas(req, manifest.name)
    if family.supports(PROMPT_SYNTAX):
        return req
    plain = {field: plain_text(getattr(req, field), req.num_inference_steps or 1, manifest, field)
             for field in ("prompt", "negative_prompt") if has_syntax(getattr(req, field))}
    return req.model_copy(update=plain) if plain else req


def plain_text(prompt: str, steps: int, manifest: ModelManifest, field: str = "prompt") -> str:
    """The prompt as plain text when its A1111 syntax means nothing but text (escaped brackets); InvalidRequest for
    weights, BREAK, prompt editing and alternation, which a family without CLIP prompt weighting cannot honour."""
    schedule = parse_prompt(prompt, steps)
    fragments = schedule.conditionings[0] if len(schedule.conditionings) == 1 else ()
    if fragments and all(f.weight == 1.0 and not f.brk for f in fragments):
        return "".join(f.text for f in fragments)
    raise InvalidRequest(
        f"{quote(manifest.name)} is a {manifest.family.name} model, whose prompts are plain text here: A1111 "
        "attention weights ((word), [word], (word:1.2)), BREAK and prompt editing ([a:b:0.5], [a|b]) are not "
        r"supported; remove them, or escape literal brackets as \( \)", field=field)
