"""A1111-style prompt encoding: weighted fragments in 75-token chunks through the pipeline's text encoders.

Each chunk is BOS + 75 tokens + EOS/padding exactly as the pipeline's tokenizer pads one prompt, so a one-chunk prompt
at weight 1 gives the very tensor diffusers' ``encode_prompt`` gives. Weights multiply the token embeddings, then
A1111's mean restore; chunks are concatenated along the sequence. SDXL: both encoders on the same chunks (penultimate
hidden states, as diffusers), the pooled embedding from text_encoder_2's first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .prompt_attention import Conditioning, Fragment, parse_attention
from .prompt_syntax import PromptSchedule, has_syntax, parse_prompt

CHUNK = 75  # tokens per chunk between BOS and EOS
BACKTRACK = 20  # A1111's comma_padding_backtrack: a chunk cut this close after a comma breaks after the comma
EMPTY: Conditioning = (Fragment(""),)
# Editing and alternation multiply a prompt into distinct texts, each encoded: their characters in all are bounded
MAX_SCHEDULED_CHARS = 40_000


@dataclass
class Encoded:
    """One prompt's embeddings: ``embeds`` (1, 77 * chunks, dim) and, for SDXL, ``pooled`` (1, dim)."""

    embeds: Any
    pooled: Any = None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


def encoders(pipe) -> list[tuple[Any, Any]]:
    """The pipeline's (tokenizer, text encoder) pairs, in diffusers' order (SDXL's refiner has only the second)."""
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def _token_ids(pipe, tokenizer, text: str) -> list[int]:
    if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion tokens (multi-vector ones expand), as diffusers
        text = pipe.maybe_convert_prompt(text, tokenizer)
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def fits_one_chunk(pipe, text: str) -> bool:
    """Whether plain ``text`` is at most 75 tokens for every tokenizer (short ASCII text needs no tokenizing)."""
    if len(text) <= CHUNK and text.isascii():
        return True
    return all(len(_token_ids(pipe, tok, text)) <= CHUNK for tok, _ in encoders(pipe))


def chunk_tokens(pipe, tokenizer, fragments: Conditioning) -> list[tuple[list[int], list[float]]]:
    """A1111's chunking: (token ids, weights) per chunk of at most 75; BREAK starts a chunk; a chunk that fills up
    within 20 tokens after a comma is cut after the comma (the rest moves to the next chunk)."""
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for fragment in fragments:
        if fragment.brk:
            chunks.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1
            continue
        if not fragment.text:
            continue
        for token in _token_ids(pipe, tokenizer, fragment.text):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                chunks.append((tokens[:cut], weights[:cut]))
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            if len(tokens) == CHUNK:
                chunks.append((tokens, weights))
                tokens, weights, last_comma = [], [], -1
            tokens.append(token)
            weights.append(fragment.weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def _chunk_tensors(tokenizer, chunks, device):
    """(ids, weights) tensors of shape (chunks, 77): BOS + tokens + EOS + padding, as ``padding="max_length"``."""
    import torch

    ids, weights = [], []
    for tokens, token_weights in chunks:
        pad = CHUNK - len(tokens)
        ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        weights.append([1.0, *token_weights, 1.0] + [1.0] * pad)
    return torch.tensor(ids, device=device), torch.tensor(weights, dtype=torch.float32)


def _hidden(pipe, encoder, ids, clip_skip: int):
    """The hidden states diffusers takes (SD: last layer or ``clip_skip`` earlier through the final layer norm;
    SDXL: the penultimate) and the pooled output of a projection encoder (SDXL's second), else None."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        return out.hidden_states[-(clip_skip + 2)], pooled
    if not clip_skip:
        return encoder(ids)[0], None
    # transformers >= 5.6 flattened CLIPTextModel: the final layer norm moved from .text_model onto the model
    norm = encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else encoder.text_model.final_layer_norm
    return norm(encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]), None


def _emphasis(z, weights):
    """A1111's weights: each chunk's token embeddings multiplied by their weights, then scaled back to the chunk's
    original mean. Chunks at weight 1 are left untouched (bit for bit)."""
    weights = weights.to(device=z.device, dtype=z.dtype)
    for index in range(z.shape[0]):
        if bool((weights[index] != 1).any()):
            original = z[index].mean()
            weighted = z[index] * weights[index].unsqueeze(-1)
            z[index] = weighted * (original / weighted.mean())
    return z


def encode_fragments(pipe, fragments: Conditioning, clip_skip: int = 0) -> Encoded:
    """Weighted fragments (``prompt_attention.parse_attention``) -> embeddings, through every text encoder."""
    import torch

    per_encoder, pooled = [], None
    with torch.inference_mode():
        chunked = [chunk_tokens(pipe, tok, fragments) for tok, _ in encoders(pipe)]
        count = max(len(chunks) for chunks in chunked)
        for (tokenizer, encoder), chunks in zip(encoders(pipe), chunked, strict=True):
            chunks = chunks + [([], [])] * (count - len(chunks))  # a tokenizer that made fewer: empty chunks
            ids, weights = _chunk_tensors(tokenizer, chunks, encoder.device)
            # one chunk per call, as A1111: a chunk's embedding never depends on how many chunks the prompt has
            outputs = [_hidden(pipe, encoder, ids[i:i + 1], clip_skip) for i in range(len(chunks))]
            per_encoder.append(_emphasis(torch.cat([z for z, _ in outputs]), weights))
            if outputs[0][1] is not None:
                pooled = outputs[0][1]  # A1111: the pooled embedding of the first chunk
        z = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
        last = encoders(pipe)[-1][1] if pooled is not None else encoders(pipe)[0][1]
        embeds = z.reshape(1, -1, z.shape[-1]).to(dtype=last.dtype)
        return Encoded(embeds, None if pooled is None else pooled.to(dtype=last.dtype))


def encode_prompt(pipe, text: str, clip_skip: int = 0) -> Encoded:
    """One prompt text (attention syntax and BREAK; no editing) -> embeddings. ``encode_prompt(pipe, "a BREAK b")``
    has two chunks: ``embeds.shape[1] == 154``."""
    return encode_fragments(pipe, parse_attention(text), clip_skip)


def pad_to(encoded: Encoded, chunks: int, empty: Encoded) -> Any:
    """``encoded``'s embeddings followed by empty-prompt chunks up to ``chunks`` (A1111 pads cond/uncond so)."""
    import torch

    extra = chunks - encoded.chunks
    return encoded.embeds if extra <= 0 else torch.cat([encoded.embeds, *[empty.embeds] * extra], dim=1)


@dataclass
class JobPrompts:
    """A job's prompt and negative prompt as schedules, decided at prepare time from the text alone."""

    prompt: PromptSchedule
    negative: PromptSchedule
    plain: bool  # no syntax in either: the pipeline may take the texts as they are (when each fits one chunk)
    negative_text: str = ""

    @property
    def edited(self) -> bool:
        return self.prompt.edited or self.negative.edited

    @property
    def batch_key(self) -> tuple | None:
        """Plain jobs batch as before; weighted ones with weighted ones (the denoiser still splits a batch by chunk
        count); jobs whose conditioning changes during sampling never batch (None)."""
        if self.edited:
            return None
        return ("plain",) if self.plain else ("weighted",)


def plan_prompts(prompt: str, negative: str, steps: int) -> JobPrompts:
    """Parse a job's prompts over its steps (cheap text work; plain text is not parsed at all)."""
    if not has_syntax(prompt) and not has_syntax(negative):
        single = ((0, steps - 1, 0),)
        return JobPrompts(PromptSchedule(((Fragment(prompt),),), single),
                          PromptSchedule(((Fragment(negative),),), single), plain=True, negative_text=negative)
    schedules = {}
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        schedule = schedules[field] = parse_prompt(text, steps)
        total = sum(len(f.text) for conditioning in schedule.conditionings for f in conditioning)
        if total > MAX_SCHEDULED_CHARS:
            raise InvalidRequest(f"prompt editing / alternation make {len(schedule.conditionings)} distinct prompts of "
                                 f"{total} characters in all; at most {MAX_SCHEDULED_CHARS}", field=field)
    return JobPrompts(schedules["prompt"], schedules["negative_prompt"], plain=False, negative_text=negative)
