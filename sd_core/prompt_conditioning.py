"""Stage 5's prompts: which jobs give the pipeline their text as is, the embeddings of the others, and the per-step
switches of prompt editing / alternation (through diffusers' ``callback_on_step_end``)."""

from __future__ import annotations

from typing import Any

from .jobs import Job
from .prompt_encoding import EMPTY, Encoded, encode_fragments, fits_one_chunk, pad_to


def takes_text(pipe, job: Job, clip_skip: int | None) -> bool:
    """The hot path: plain prompts that fit one chunk, no clip skip: the pipeline encodes the text itself."""
    plan = job.prompts
    if plan is None or not job.manifest.family.supports("prompt_syntax"):  # no A1111 encoding: the pipeline's own
        return True
    req = job.request
    return plan.plain and not clip_skip and fits_one_chunk(pipe, req.prompt) and fits_one_chunk(
        pipe, req.negative_prompt)


class JobConditioning:
    """One job's encoded conditionings (each distinct one once) and the pair in force at each step."""

    def __init__(self, pipe, job: Job, clip_skip: int | None, empty: Encoded):
        plan = job.prompts
        skip = clip_skip or 0
        self.plan = plan
        self.images = len(job.seeds)
        self.empty = empty
        self.positive = [encode_fragments(pipe, c, skip) for c in plan.prompt.conditionings]
        # SDXL: an empty negative prompt is the zero embedding (force_zeros_for_empty_prompt), as diffusers does
        self.zero_negative = not plan.negative_text and bool(getattr(pipe.config, "force_zeros_for_empty_prompt",
                                                                     False))
        self.negative = [] if self.zero_negative else [encode_fragments(pipe, c, skip)
                                                       for c in plan.negative.conditionings]

    def indices(self, step: int) -> tuple[int, int]:
        return self.plan.prompt.index_at(step), 0 if self.zero_negative else self.plan.negative.index_at(step)

    @property
    def length(self) -> int:
        """Chunks of the pair at step 0 (batched jobs never change conditioning, so this is their length)."""
        pos, neg = self.indices(0)
        return max(self.positive[pos].chunks, 0 if self.zero_negative else self.negative[neg].chunks)

    def pair(self, step: int) -> tuple[Any, Any, Any, Any]:
        """(positive, negative, positive pooled, negative pooled) at ``step``, padded to equal chunk counts."""
        import torch

        pos_index, neg_index = self.indices(step)
        pos = self.positive[pos_index]
        if self.zero_negative:
            embeds = pos.embeds
            pooled = pos.pooled
            return embeds, torch.zeros_like(embeds), pooled, None if pooled is None else torch.zeros_like(pooled)
        neg = self.negative[neg_index]
        chunks = max(pos.chunks, neg.chunks)
        return pad_to(pos, chunks, self.empty), pad_to(neg, chunks, self.empty), pos.pooled, neg.pooled


def _rows(tensors: list, counts: list[int]):
    import torch

    return torch.cat([t.repeat(count, *[1] * (t.ndim - 1)) for t, count in zip(tensors, counts, strict=True)])


class BatchConditioning:
    """The pipeline arguments of a group of embedding-path jobs (equal lengths), and the step callback that swaps
    the conditioning when a job's schedule moves on."""

    def __init__(self, conditionings: list[JobConditioning]):
        self.jobs = conditionings
        self.counts = [c.images for c in conditionings]
        self.current = [c.indices(0) for c in conditionings]
        self.pooled = conditionings[0].positive[0].pooled is not None
        self.edited = any(c.plan.edited for c in conditionings)

    def tensors(self, step: int) -> tuple[Any, Any, Any, Any]:
        pairs = [c.pair(step) for c in self.jobs]
        pos, neg = _rows([p[0] for p in pairs], self.counts), _rows([p[1] for p in pairs], self.counts)
        if not self.pooled:
            return pos, neg, None, None
        return pos, neg, _rows([p[2] for p in pairs], self.counts), _rows([p[3] for p in pairs], self.counts)

    def kwargs(self) -> dict[str, Any]:
        pos, neg, pos_pooled, neg_pooled = self.tensors(0)
        out = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        if self.pooled:
            out.update(pooled_prompt_embeds=pos_pooled, negative_pooled_prompt_embeds=neg_pooled)
        if self.edited:
            out["callback_on_step_end_tensor_inputs"] = ["prompt_embeds", *(["add_text_embeds"] if self.pooled
                                                                            else [])]
        return out

    def on_step_end(self, pipeline, step: int, callback_kwargs: dict) -> dict:
        """After step ``step``: the conditioning of the next step, in the layout the pipeline's loop reads
        ([negative, positive] along the batch with classifier-free guidance)."""
        if not self.edited:
            return callback_kwargs
        upcoming = [c.indices(step + 1) for c in self.jobs]
        if upcoming == self.current:
            return callback_kwargs
        self.current = upcoming
        import torch

        pos, neg, pos_pooled, neg_pooled = self.tensors(step + 1)
        guided = pipeline.do_classifier_free_guidance
        old = callback_kwargs["prompt_embeds"]
        embeds = torch.cat([neg, pos]) if guided else pos
        callback_kwargs["prompt_embeds"] = embeds.to(device=old.device, dtype=old.dtype)
        if self.pooled:
            old = callback_kwargs["add_text_embeds"]
            pooled = torch.cat([neg_pooled, pos_pooled]) if guided else pos_pooled
            callback_kwargs["add_text_embeds"] = pooled.to(device=old.device, dtype=old.dtype)
        return callback_kwargs


def plan_groups(pipe, jobs: list[Job], clip_skip: int | None) -> list[tuple[list[int], BatchConditioning | None]]:
    """The batch split into pipeline calls: (job indices, None for the text path or the embeddings). Jobs of one call
    share a conditioning length, so each job's image equals its image alone."""
    text = [i for i, job in enumerate(jobs) if takes_text(pipe, job, clip_skip)]
    groups: list[tuple[list[int], BatchConditioning | None]] = [(text, None)] if text else []
    rest = [i for i in range(len(jobs)) if i not in text]
    if not rest:
        return groups
    empty = encode_fragments(pipe, EMPTY, clip_skip or 0)
    by_length: dict[int, list[tuple[int, JobConditioning]]] = {}
    for i in rest:
        conditioning = JobConditioning(pipe, jobs[i], clip_skip, empty)
        by_length.setdefault(conditioning.length, []).append((i, conditioning))
    for members in by_length.values():
        groups.append(([i for i, _ in members], BatchConditioning([c for _, c in members])))
    return groups
