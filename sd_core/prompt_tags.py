"""A1111 LoRA prompt tags: ``<lora:name:scale>`` parsed off a prompt into LoraSpecs, and LoRA labels for sources."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from .checkpoints import PICKLE_SUFFIXES
from .errors import QUOTE_MAX_CHARS, InvalidRequest, quote
from .schema import MAX_LORAS, MAX_PROMPT_CHARS, LoraSpec

# <lora:name>, <lora:name:0.8>, <lora:name:te:unet> and A1111's named forms <lora:name:te=0.5:unet=0.8>.
# Linear in the prompt: a match starts only at "<", and its body stops at the next "<" or ">", so no character is
# scanned from two starts (a prompt of "<lora:" repeated costs one pass).
TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,20}://")


def strip_prompt_tags(prompt: str) -> str:
    """The prompt without its LoRA tags, which are not applied (A1111's ``disable_extra_networks``)."""
    return _SPACES.sub(" ", TAG.sub("", prompt)).strip()


def parse_prompt_tags(prompt: str) -> tuple[str, list[LoraSpec]]:
    """Split A1111 LoRA tags off a prompt: ``"a fox <lora:ink:0.7>"`` -> ``("a fox", [LoraSpec(ink, 0.7)])``.

    Positional values follow A1111: ``<lora:name:te:unet>`` (one value sets both). ``<lora:name>`` means the
    manifest's scale for that LoRA (1.0 unless the manifest says otherwise).
    """
    if len(prompt) > MAX_PROMPT_CHARS:  # the schema's limit: parsed only within it
        raise InvalidRequest(f"longer than {MAX_PROMPT_CHARS} characters", field="prompt")
    specs: list[LoraSpec] = []
    for match in TAG.finditer(prompt):
        if len(specs) == MAX_LORAS:
            raise InvalidRequest(f"more than {MAX_LORAS} LoRA tags; at most {MAX_LORAS} LoRAs per request",
                                 field="prompt")
        specs.append(_tag_spec(match.group(0), match.group(1)))
    if not specs:
        return prompt, []
    return strip_prompt_tags(prompt), specs


def _split_tag(body: str) -> tuple[str, list[str]]:
    """A tag's body -> (LoRA name or URL, its scale arguments). A URL keeps its own colons (port, user:password):
    only trailing parts that read as arguments (numbers, te=/unet=/dyn=) are split off it."""
    parts = [part.strip() for part in body.split(":")]
    if not _URL_START.match(body.lstrip()):
        return parts[0], parts[1:]
    args: list[str] = []
    while len(parts) > 2 and len(args) < 3 and _is_tag_arg(parts[-1]):
        args.insert(0, parts.pop())
    return ":".join(parts), args


def _is_tag_arg(part: str) -> bool:
    key, sep, _value = part.partition("=")
    if sep:
        return key.strip().lower() in ("te", "unet", "dyn")
    try:
        float(part)
    except ValueError:
        return False
    return True


def _tag_spec(tag: str, body: str) -> LoraSpec:
    name, args = _split_tag(body)
    tag = tag if len(tag) <= QUOTE_MAX_CHARS else quote(tag)  # errors show a long tag shortened (SDError scrubs)
    if not name:
        raise InvalidRequest(f"{tag}: the LoRA tag names no LoRA", field="prompt")
    positional, named = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep:
            named[key.strip().lower()] = value.strip()
        else:
            positional.append(arg)
    if len(positional) > 3 or set(named) - {"te", "unet", "dyn"}:
        raise InvalidRequest(f"{tag}: expected <lora:name>, <lora:name:scale> or <lora:name:te:unet>", field="prompt")
    te = named.get("te", positional[0] if positional else None)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    values: dict[str, object] = {"source": name}
    try:
        if unet is not None:
            values["scale"] = float(unet)
        if te is not None:
            values["text_encoder_scale"] = float(te)
        return LoraSpec(**values)
    except (ValueError, ValidationError) as exc:
        reason = exc.errors(include_url=False)[0]["msg"] if isinstance(exc, ValidationError) else "not a number"
        raise InvalidRequest(f"{tag}: {reason}", field="prompt") from None


def lora_label(uri: str) -> str:
    """A short name for a LoRA given by URI or path: its file name without extension (at most 100 characters)."""
    path = urlsplit(uri).path if "://" in uri else uri
    stem = Path(path.rstrip("/")).name
    for suffix in (".safetensors", *PICKLE_SUFFIXES):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)] or stem
            break
    return stem[:100] or "lora"
