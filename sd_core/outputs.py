"""Output images: encoding to PNG/WebP/JPEG with the A1111 `parameters` text (infotext) embedded."""

from __future__ import annotations

import io
import json
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .schedulers import SAMPLERS, UNIFORM, split_name
from .schema import GeneratedImage

MIME_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
_EXIF_USER_COMMENT = 0x9286
GENERATOR = "sd-serverless"  # the infotext's `Version`: A1111's backcompat switches only apply to A1111 versions

_PARAMETER = re.compile(r'\s*([A-Za-z][\w /-]*):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


def split_sampler(name: str) -> tuple[str, str]:
    """A canonical sampler name -> A1111's (Sampler, Schedule type): "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    A plain name runs diffusers' evenly spaced sigmas: that is A1111's `Uniform` for samplers whose A1111 `Automatic`
    is another schedule (DPM++ 2M: Karras), and `Automatic` for the others (where the two are the same).
    """
    sampler, spelled = split_name(name)
    if spelled is not None:
        return sampler, spelled
    return sampler, "Automatic" if SAMPLERS[sampler].automatic == UNIFORM else UNIFORM


def lora_name(label: str) -> str:
    """A LoRA's name as A1111 writes it in tags and `Lora hashes` (no `:` `,` `<` `>` or line breaks)."""
    return re.sub(r"\s+", " ", re.sub(r"[:,<>]", "", label)).strip() or "lora"


def lora_tag(label: str, unet_scale: float, text_encoder_scale: float) -> str:
    """A1111's tag for a LoRA at these weights: ``<lora:name:w>``, or ``<lora:name:te:unet>`` when they differ."""
    weights = f"{unet_scale:g}" if unet_scale == text_encoder_scale else f"{text_encoder_scale:g}:{unet_scale:g}"
    return f"<lora:{lora_name(label)}:{weights}>"


def _quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a separator (`,` `:` a line break) or a quote."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r'[,:\n"]', text) else text


def infotext(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int, width: int,
    height: int, model: str, model_hash: str | None = None, strength: float | None = None,
    lora_hashes: dict[str, str] | None = None, clip_skip: int = 0, subseed: int | None = None,
    subseed_strength: float | None = None, eta: float | None = None, tiling: bool = False, vae: str | None = None,
    vae_hash: str | None = None, hires: dict[str, object] | None = None, ti_hashes: dict[str, str] | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """The generation parameters in A1111's infotext format (what its PNG Info tab reads back).

    `prompt` is the prompt as A1111 would show it, its `<lora:...>` tags included; `model_hash` the checkpoint
    file's sha256 and `lora_hashes` {LoRA name: its file's sha256} (A1111 writes 10 and 12 hex digits of them);
    `clip_skip` the layers skipped (diffusers' count), written as A1111's `Clip skip` (one more) when any.
    `subseed` and `subseed_strength` (A1111's `Variation seed`, `Variation seed strength`) only when varied.
    `vae` the alternate VAE's name and `vae_hash` its file's sha256 (A1111's `VAE hash`, `VAE`), when one was chosen.
    `hires`: the hires fix's `Hires ...` fields in order (sd_core/hires.py), after `RNG` as A1111 writes them.
    `ti_hashes` {embedding name: its file's sha256} for the textual-inversion embeddings the prompts used.
    `extra`: further fields of a post-pass (the refiner's), written where A1111 writes its extra parameters.
    """
    sampler_name, schedule = split_sampler(sampler)
    default_eta = SAMPLERS[sampler_name].eta
    eta = None if eta is None or eta == default_eta or not SAMPLERS[sampler_name].eta_adjustable else f"{eta:g}"
    fields = {
        "Steps": steps, "Sampler": sampler_name, "Schedule type": schedule, "CFG scale": f"{cfg_scale:g}",
        "Seed": seed, "Size": f"{width}x{height}", "Model hash": model_hash[:10] if model_hash else None,
        "Model": model, "VAE hash": vae_hash[:10] if vae and vae_hash else None, "VAE": vae,
        "Variation seed": subseed,
        "Variation seed strength": None if subseed_strength is None else f"{subseed_strength:g}",
        "Denoising strength": None if strength is None else f"{strength:g}",
        "Clip skip": clip_skip + 1 if clip_skip else None,  # A1111 counts the last layer: 1 (unwritten) = no skip
        "Eta DDIM" if sampler_name == "DDIM" else "Eta": eta,  # as A1111: only an eta other than the default
        "Tiling": "True" if tiling else None,
        "RNG": "CPU",  # every image's noise comes from a CPU generator seeded with its seed (A1111's RNG: CPU)
        **(hires or {}),
        "Lora hashes": ", ".join(f"{lora_name(name)}: {digest[:12]}" for name, digest in lora_hashes.items())
        if lora_hashes else None,
        # A1111: the embeddings the prompts used, as {name: 12 hex digits of the file's sha256}
        "TI hashes": ", ".join(f"{lora_name(name)}: {digest[:12]}" for name, digest in ti_hashes.items())
        if ti_hashes else None,
        **(extra or {}),
        "Version": GENERATOR,
    }
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def infotext_parameters(text: str) -> dict[str, str]:
    """The `key: value` pairs of an infotext's last line (quoted values unquoted); {} if it holds none."""
    found = {}
    for key, value in _PARAMETER.findall(text.strip().rsplit("\n", 1)[-1]):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        found[key.strip()] = value.strip() if isinstance(value, str) else value
    return found


def encode_image(image: Image.Image, *, fmt: str, quality: int, parameters: str, seed: int) -> GeneratedImage:
    """Encode one PIL image; the parameters go in a PNG text chunk, or EXIF UserComment for JPEG/WebP."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    else:
        exif = Image.Exif()
        exif[_EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    return GeneratedImage(
        data=buffer.getvalue(), mime_type=MIME_TYPES[fmt], extension=EXTENSIONS[fmt], seed=seed,
        width=image.width, height=image.height,
    )


def read_parameters(data: bytes) -> str | None:
    """The embedded infotext of an encoded image (PNG text chunk or EXIF UserComment), if any."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    raw = image.getexif().get_ifd(0x8769).get(_EXIF_USER_COMMENT) or image.getexif().get(_EXIF_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None
