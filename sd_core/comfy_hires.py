"""ComfyUI hires fix: a second KSampler on a latent- or model-upscaled first pass -> the request's ``hires`` field."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import quote

if TYPE_CHECKING:
    from .comfy_graph import Node
    from .comfy_nodes import ModelChain, Translator

# ComfyUI's latent upscale_method -> the hires fix's latent upscaler doing the same torch interpolate call.
LATENT_METHODS = {"bilinear": "Latent", "bicubic": "Latent (bicubic)", "nearest-exact": "Latent (nearest-exact)"}


def latent_hires(translator: Translator, second: Node, upscale: Node, fields: dict, model: ModelChain,
                 run: int) -> dict:
    """A second pass on a LatentUpscale / LatentUpscaleBy of the first pass's latent: the first pass's fields with
    ``hires`` set (a latent upscaler)."""
    source, _ = translator.graph.source(upscale, "samples")
    first = _first_pass(translator, second, source, model, fields)
    method = upscale.inputs["upscale_method"]
    if method not in LATENT_METHODS:
        raise upscale.error(f"upscale_method {quote(method)} is not supported; use {', '.join(LATENT_METHODS)}")
    cells_w, cells_h = first["width"] // 8, first["height"] // 8
    if upscale.class_type == "LatentUpscaleBy":
        scale = upscale.inputs["scale_by"]
        width, height = round(cells_w * scale) * 8, round(cells_h * scale) * 8  # ComfyUI rounds latent cells
    else:
        width, height = int(upscale.inputs["width"]), int(upscale.inputs["height"])
        if width % 8 or height % 8 or not width or not height:
            raise upscale.error("width and height must be given, as multiples of 8")
    if width * first["height"] != height * first["width"] or width < first["width"]:
        raise upscale.error(f"{first['width']}x{first['height']} to {width}x{height}: only upscales keeping "
                            "the aspect ratio are supported (the hires fix neither stretches nor shrinks)")
    return _hires(first, fields, run, LATENT_METHODS[method], width=width, height=height)


def model_hires(translator: Translator, second: Node, encode: Node, upscale: Node, fields: dict, model: ModelChain,
                run: int) -> dict:
    """A second pass on a VAEEncode of an ImageUpscaleWithModel of the first pass's decoded image: the first pass's
    fields with ``hires`` set (a model upscaler at its native scale)."""
    from .comfy_nodes import model_name  # comfy_nodes imports this module

    translator.check_vae(encode, model)
    loader, _ = translator.graph.source(upscale, "upscale_model")
    decode, _ = translator.graph.source(upscale, "image")
    if decode.class_type != "VAEDecode":
        raise upscale.error(f"its image must be a VAEDecode of the first KSampler, not {decode.label}")
    translator.check_vae(decode, model)
    source, _ = translator.graph.source(decode, "samples")
    first = _first_pass(translator, second, source, model, fields)
    name = model_name(loader.inputs["model_name"])
    scale = translator.upscaler_scale(name) if translator.upscaler_scale is not None else None
    if scale is None:
        raise loader.error(f"unknown upscale model {quote(loader.inputs['model_name'])} (docs/models.md)")
    return _hires(first, fields, run, name, scale=scale)


def _first_pass(translator: Translator, second: Node, first_node: Node, model: ModelChain, fields: dict) -> dict:
    if first_node.class_type not in ("KSampler", "KSamplerAdvanced"):
        raise second.error(f"a hires second pass must upscale a KSampler's output, not {first_node.label}")
    first, first_model = translator.sampler_fields(first_node)
    if first.get("image") is not None or first.get("hires") is not None:
        raise first_node.error("a hires first pass must be txt2img (an EmptyLatentImage)")
    if first.get("controlnets"):
        raise first_node.error("ControlNets in a two-pass (hires) workflow are not supported by this worker")
    if (first_model.checkpoint, first_model.clip, first_model.loras.keys()) != (
            model.checkpoint, model.clip, model.loras.keys()) or first["loras"] != fields["loras"]:
        raise second.error("the hires second pass must use the first pass's checkpoint, LoRAs and CLIP")
    if fields["seed"] != first["seed"]:
        raise second.error(f"the hires second pass runs with the first pass's seed here ({first['seed']}), "
                           f"got {fields['seed']}")
    for key in ("prompt", "negative_prompt"):  # the hires fix reads an empty second-pass text as "the first's"
        if fields[key] != first[key] and not fields[key]:
            raise second.error(f"an empty second-pass {key.replace('_', ' ')} is not supported with a "
                               "non-empty first one")
    return first


def _hires(first: dict, fields: dict, run: int, upscaler: str, **size) -> dict:
    hires = {"upscaler": upscaler, "steps": run, "denoising_strength": fields["strength"], **size}
    if fields["prompt"] != first["prompt"]:
        hires["prompt"] = fields["prompt"]
    if fields["negative_prompt"] != first["negative_prompt"]:
        hires["negative_prompt"] = fields["negative_prompt"]
    if fields["scheduler"] != first["scheduler"]:
        hires["scheduler"] = fields["scheduler"]
    if fields["guidance_scale"] != first["guidance_scale"]:
        hires["guidance_scale"] = fields["guidance_scale"]
    return {**first, "hires": hires}
