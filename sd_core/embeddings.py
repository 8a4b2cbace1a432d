"""Textual-inversion embeddings (A1111 files): names found as whole words in prompts, loaded under reserved tokens."""

from __future__ import annotations

import functools
import logging
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import is_readable_safetensors
from .errors import InvalidRequest, ModelNotFound, quote
from .lora import fetch_weights, pickle_message, quiet_libraries
from .manifests import EmbeddingEntry, ModelCatalog, ModelManifest, resolve_uri
from .schema import GenerationRequest
from .settings import Settings
from .user_urls import CheckedURL, check_lora_source, redact_url

log = logging.getLogger("sd_core.embeddings")

FIELD = "embeddings"
# Each embedding is loaded under its own internal token: HF tokenizers match added tokens anywhere in a word ("bad"
# would split "badger"), while A1111 triggers an embedding on the whole word only. So stage 3 replaces whole-word
# names with the token, and the token's prefix is refused in user prompts.
TOKEN_PREFIX = "sdemb_"
_RESERVED = re.compile(re.escape(TOKEN_PREFIX), re.IGNORECASE)
# A1111 finds a name where the prompt's CLIP tokens contain the name's tokens, i.e. on CLIP's word boundaries: a run of
# letters is one word, every digit is a word of its own, a run of other signs (`_` included) is one word; spaces and
# the attention syntax's brackets and colons separate. So a name is found unless a letter touches a letter at its
# edge ("bad" is not in "badger", "EasyNegative" is in "EasyNegative2" and "(EasyNegative:1.2)"), or a sign a sign.
_LETTER, _SIGN = r"[^\W\d_]", r"(?:[^\s\w]|_)"
MAX_VECTORS = 75  # one CLIP chunk holds 75 tokens
SDXL_KEYS = ("clip_l", "clip_g")  # A1111's SDXL layout: one tensor per text encoder
ENCODERS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}


@dataclass(frozen=True)
class ResolvedEmbedding:
    """One embedding a prompt uses, fetched: its trigger name, file, content hash and vectors per text encoder."""

    name: str
    source: str  # redacted, for messages
    path: Path
    sha256: str
    vectors: dict = field(compare=False, hash=False, repr=False)  # "clip_l" (and "clip_g" for SDXL) -> (n, width)

    @property
    def token(self) -> str:
        # Named by content (64 bits of it): the same file under two names is one token; a changed file is a new one.
        return TOKEN_PREFIX + self.sha256[:16]


def read_vectors(path: Path, shown: str, allow_pickle: bool) -> dict:
    """An embedding file's vectors: {"clip_l": (n, w)} for SD1.x/SD2 files ({"emb_params"}, A1111's
    `string_to_param`, diffusers' one-tensor file), {"clip_l", "clip_g"} for SDXL files."""
    import torch

    if is_readable_safetensors(path):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif allow_pickle:  # A1111 .pt / diffusers .bin, trusted by the operator (weights_only still refuses code)
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    else:
        raise InvalidRequest(pickle_message(shown, "embedding"), field=FIELD)
    if isinstance(state, dict) and isinstance(state.get("string_to_param"), dict):
        state = {f"string_to_param.{k}": v for k, v in state["string_to_param"].items()}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if all(key in tensors for key in SDXL_KEYS):
        found = {key: tensors[key] for key in SDXL_KEYS}
    else:
        params = [k for k in tensors if k.startswith("string_to_param.")]
        key = "emb_params" if "emb_params" in tensors else params[0] if len(params) == 1 else (
            next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None:
            raise InvalidRequest(f"{shown}: not a textual-inversion embedding (expected one tensor, `emb_params`, "
                                 f"`string_to_param` or SDXL's `clip_l` + `clip_g`)", field=FIELD)
        found = {"clip_l": tensors[key]}
    for key, tensor in found.items():
        tensor = tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
        if tensor.dim() != 2 or not 1 <= tensor.shape[0] <= MAX_VECTORS or not tensor.is_floating_point():
            raise InvalidRequest(f"{shown}: {key} has shape {list(tensor.shape)}; an embedding is 1-{MAX_VECTORS} "
                                 "vectors", field=FIELD)
        found[key] = tensor.float()
    return found


@functools.lru_cache(maxsize=64)  # one pattern per set of known names (the catalog's, plus a request's own)
def find_names(names: tuple[str, ...]) -> re.Pattern:
    """The pattern of ``names`` (any case, longest first) where A1111 finds them in a prompt: as whole CLIP words."""

    def edge(char: str) -> str | None:
        return _LETTER if re.match(_LETTER, char) else None if char.isdigit() else _SIGN

    alternatives = []
    for name in sorted(names, key=len, reverse=True):
        before, after = edge(name[0]), edge(name[-1])
        alternatives.append((f"(?<!{before})" if before else "") + re.escape(name) + (f"(?!{after})" if after else ""))
    return re.compile("|".join(alternatives), re.IGNORECASE)


class EmbeddingManager:
    """Finds the embeddings prompts name (stage 3, no GPU) and keeps them loaded per model (stage 5, GPU lock).

    Loaded embeddings stay as tokens of the model's tokenizers, at most SD_MAX_EMBEDDINGS per model (least recently
    used out first); a prompt that does not contain a token is encoded exactly as before it was loaded.
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog):
        self.settings = settings
        self.catalog = catalog
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoadedModel -> {sha256: tokens}

    # --- stage 3, before the GPU lock -------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, manifest: ModelManifest
                ) -> tuple[GenerationRequest, tuple[ResolvedEmbedding, ...]]:
        """Replace the whole-word names of known embeddings (the request's `embeddings`, then the manifests') in the
        prompt and negative prompt with their tokens; fetch those used. Returns the request and the used ones."""
        for name in ("prompt", "negative_prompt"):
            if _RESERVED.search(getattr(request, name)):
                raise InvalidRequest(f"{quote(TOKEN_PREFIX)} is reserved for internal embedding tokens; write the "
                                     "embedding's name instead", field=name)
        manifest_entries = self.catalog.embeddings_for(manifest)
        known: dict[str, tuple[str, EmbeddingEntry | CheckedURL]] = {
            key: (entry.name, entry) for key, entry in manifest_entries.items()}
        given: set[str] = set()
        for index, spec in enumerate(request.embeddings):
            where = f"{FIELD}.{index}.source"
            key = spec.name.lower()
            if key in given:
                raise InvalidRequest(f"{quote(spec.name)} is given twice", field=f"{FIELD}.{index}.name")
            given.add(key)
            checked = check_lora_source(spec.source.strip(), field=where, settings=self.settings)
            if isinstance(checked, str):
                entry = manifest_entries.get(checked.lower())
                if entry is None:
                    raise ModelNotFound(
                        f"unknown embedding {quote(checked)} for {manifest.name} ({manifest.architecture}); "
                        f"available: {', '.join(e.name for e in manifest_entries.values()) or 'none'}; or give an "
                        "https:// or s3:// URL", field=where)
                known[key] = (spec.name, entry)
            else:
                known[key] = (spec.name, checked)
        if not known:
            return request, ()
        pattern = find_names(tuple(sorted(name for name, _ in known.values())))
        used: dict[str, ResolvedEmbedding] = {}

        def token(match: re.Match) -> str:
            key = match.group(0).lower()
            if key not in used:
                used[key] = self._resolve(*known[key], manifest)
            # Spaced off: "bad_1" must not read as the token's own second vector `<token>_1` (CLIP ignores spaces)
            return f" {used[key].token} "

        prompt = pattern.sub(token, request.prompt)
        negative = pattern.sub(token, request.negative_prompt)
        if not used:
            return request, ()
        return request.model_copy(update={"prompt": prompt, "negative_prompt": negative}), tuple(used.values())

    def _resolve(self, name: str, source: EmbeddingEntry | CheckedURL, manifest: ModelManifest) -> ResolvedEmbedding:
        if isinstance(source, EmbeddingEntry):
            uri, sha256, size, shown, user_given = (resolve_uri(source.uri, self.settings), source.sha256, source.size,
                                                    source.name, False)
        else:
            uri, sha256, size, shown, user_given = source.url, None, None, redact_url(source.url), True
        path, digest = fetch_weights(self.settings, uri, sha256, size, shown, user_given=user_given, field=FIELD,
                                     what="embedding")
        vectors = read_vectors(path, shown, self.settings.allow_pickle)
        wanted = manifest.family.embedding_keys
        if set(vectors) != set(wanted):
            made_for = "SDXL (clip_l + clip_g)" if "clip_g" in vectors else "SD1.x/SD2 (one text encoder)"
            raise InvalidRequest(f"{shown}: is an embedding for {made_for} models; {manifest.name} is "
                                 f"{manifest.architecture}", field=FIELD)
        return ResolvedEmbedding(name=name, source=shown, path=path, sha256=digest, vectors=vectors)

    # --- stage 5, inside the GPU lock -------------------------------------------------------------------------
    def loaded(self, model) -> list[str]:
        """Tokens of the embeddings held for ``model``, least recently used first."""
        state = self._states.get(model)
        return [TOKEN_PREFIX + sha[:16] for sha in state] if state else []

    def activate(self, model, embeddings) -> None:
        """Make sure ``embeddings`` (of all jobs of a batch) are loaded on ``model``; others stay, up to the limit.

        Must be called with the engine's GPU lock held (the tokenizers and text encoders change).
        """
        if not embeddings:
            return
        state = self._states.setdefault(model, OrderedDict())
        pipe = model.pipeline("txt2img")
        keep = {item.sha256 for item in embeddings}
        for item in embeddings:
            if item.sha256 in state:
                state.move_to_end(item.sha256)
                continue
            limit = max(1, self.settings.max_embeddings)
            for sha in [sha for sha in state if sha not in keep][:max(0, len(state) + 1 - limit)]:
                self._unload(pipe, state.pop(sha))
                log.info("embedding %s unloaded (SD_MAX_EMBEDDINGS=%d)", TOKEN_PREFIX + sha[:16], limit)
            state[item.sha256] = self._load(pipe, model.manifest, item)

    def _load(self, pipe, manifest: ModelManifest, item: ResolvedEmbedding) -> dict[str, list[str]]:
        started = time.perf_counter()
        added: dict[str, list[str]] = {}
        try:
            for key, tensor in item.vectors.items():
                tokenizer_name, encoder_name = ENCODERS[key]
                tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
                width = encoder.get_input_embeddings().weight.shape[-1]
                if tensor.shape[-1] != width:
                    raise InvalidRequest(f"{item.source}: {key} vectors are {tensor.shape[-1]} wide, {manifest.name}'s "
                                         f"text encoder takes {width}; is it an embedding for another base model?",
                                         field=FIELD)
                if item.token in tokenizer.get_vocab():  # 64 bits of two different files' hashes agree
                    raise InvalidRequest(f"{item.source}: its token collides with a loaded embedding's", field=FIELD)
                tokens = [item.token] + [f"{item.token}_{i}" for i in range(1, tensor.shape[0])]
                with quiet_libraries():
                    pipe.load_textual_inversion(tensor, token=item.token, tokenizer=tokenizer, text_encoder=encoder)
                added[key] = tokens
        except BaseException:
            self._unload(pipe, added)
            raise
        log.info("embedding %s loaded as %s in %.2fs", item.source, item.token, time.perf_counter() - started)
        return added

    @staticmethod
    def _unload(pipe, added: dict[str, list[str]]) -> None:
        for key, tokens in added.items():
            tokenizer_name, encoder_name = ENCODERS[key]
            with quiet_libraries():
                pipe.unload_textual_inversion(tokens, tokenizer=getattr(pipe, tokenizer_name),
                                              text_encoder=getattr(pipe, encoder_name))


def embedding_header(path: Path) -> tuple[int, int] | None:
    """(vectors, width) of a local .safetensors embedding from its header (no tensor read), as A1111 counts them (an
    SDXL file: clip_g's vectors, clip_l + clip_g's widths); None if unreadable."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if all(key in keys for key in SDXL_KEYS):
                shapes = [handle.get_slice(key).get_shape() for key in ("clip_g", "clip_l")]
            else:
                key = "emb_params" if "emb_params" in keys else keys[0] if len(keys) == 1 else None
                shapes = [handle.get_slice(key).get_shape()] if key else []
    except Exception:  # noqa: BLE001 - a listing shows what it can
        return None
    if not shapes or any(len(shape) not in (1, 2) for shape in shapes):
        return None
    return (shapes[0][0] if len(shapes[0]) == 2 else 1), sum(shape[-1] for shape in shapes)
