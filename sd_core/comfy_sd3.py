"""ComfyUI SD3 / SD3.5 graphs (TripleCLIPLoader, CLIPTextEncodeSD3, ModelSamplingSD3, conditioning ranges) -> one
SD3 request, or a refusal naming the node."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from . import comfy_samplers as flow
from .comfy_flux import base_name, chain_reaches, check_latent, check_plain_prompt, check_seed, check_steps, file_name
from .comfy_graph import Graph, Node
from .errors import quote

# SAI's stock SD3 / SD3.5 text encoder files (stabilityai/stable-diffusion-3.5-*/text_encoders): every SD3 model's own
# CLIP-L, CLIP-G and T5-XXL. Others (fp8 T5s, fine-tuned encoders) are refused: the engine runs the model's own.
STOCK_CLIPS = ("clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors")
DEFAULT_SHIFT = 3.0  # ComfyUI's SD3 / SD3.5 sampling shift when no ModelSamplingSD3 node sets one (supported_models)
# ComfyUI's SD3 T5 tokenizer pads to at least 77 tokens and never truncates: diffusers' T5 run at 77 tokens is the
# same exactly when the prompt fits in them (a longer one is refused by the token check).
T5_TOKENS = 77
CLIP_TOKENS = 77  # ComfyUI splits longer CLIP prompts into 77-token chunks; diffusers truncates: refused
SD3_NODES = frozenset({"TripleCLIPLoader", "CLIPTextEncodeSD3", "ModelSamplingSD3"})
RANGE_NODES = ("ConditioningSetTimestepRange", "ConditioningCombine", "ConditioningZeroOut")


def uses_sd3(translator, sampler: Node) -> bool:
    """Whether ``sampler`` (a KSampler) samples an SD3 model: an SD3-only node on its model or prompt links, or a
    CheckpointLoaderSimple of an SD3 model (the catalog's family)."""
    return chain_reaches(translator, sampler, SD3_NODES, "sd3",
                         ("model", "positive", "conditioning", "conditioning_1", "clip"))


class SD3Sampler:
    """One KSampler of an SD3 model and what feeds it -> the native request's fields."""

    def __init__(self, translator, sampler: Node):
        self.graph: Graph = translator.graph
        self.translator = translator
        self.sampler = sampler

    def fields(self, decode: Node) -> tuple[dict, Callable]:
        """The request fields (ComfyUI's schedule as ``sigmas``) and the prompt check (model folder, skipped
        components), run with the model's own files before any generation."""
        node = self.sampler
        if node.class_type != "KSampler":
            raise decode.error(f"its samples must come from a KSampler for an SD3 model, not from {node.label}")
        inputs = node.inputs
        loader, sampling = self._model(node)
        name = file_name(loader.inputs["ckpt_name"])
        cfg = inputs["cfg"]
        if cfg < 1:
            raise node.error(f"cfg {quote(cfg, 20)} is not supported: below 1 ComfyUI still mixes in the negative "
                             "prompt, where the engine (diffusers) turns guidance off; use 1 or more")
        seed, steps = check_seed(node, "seed"), check_steps(node)
        if inputs["denoise"] != 1:
            raise node.error(f"denoise {quote(inputs['denoise'], 20)} is not supported on SD3 here (SD3 workflows run "
                             "txt2img: denoise 1 on an empty latent)")
        if inputs["sampler_name"] != "euler":
            raise node.error(f"sampler_name {quote(inputs['sampler_name'], 40)} does not run SD3 here; supported: "
                             "euler (flow-matching Euler, diffusers' FlowMatchEulerDiscreteScheduler)")
        prompts = [self._prompt(node, "positive", loader)]
        # cfg 1: ComfyUI skips the negative prompt and so does diffusers (no classifier-free guidance)
        prompts.append(self._prompt(node, "negative", loader) if cfg != 1 else None)
        width, height, count = check_latent(node, self.graph.source(node, "latent_image")[0], "SD3")
        vae, index = self.graph.source(decode, "vae")
        if vae is not loader or index != 2:
            raise decode.error(f"its vae must be the VAE output (2) of the SD3 CheckpointLoaderSimple "
                               f"{loader.label} (the model's own VAE), not {vae.label}")
        fields = {"model": name, "prompt": prompts[0][1], "negative_prompt": prompts[1][1] if prompts[1] else "",
                  "seed": seed, "guidance_scale": float(cfg), "scheduler": "Euler",
                  "width": width, "height": height, "num_outputs": count, "max_sequence_length": T5_TOKENS}
        fields["sigmas"] = self._schedule(node, sampling, steps)
        fields["num_inference_steps"] = len(fields["sigmas"])  # beta's repeated sigmas dropped: maybe fewer
        encoders = [p[0] for p in prompts if p is not None]
        return fields, _token_check(encoders, name)

    # --- model ---------------------------------------------------------------------------------------------------
    def _model(self, sampler: Node) -> tuple[Node, Node | None]:
        node, index = self.graph.source(sampler, "model")
        sampling = None
        while node.class_type == "ModelSamplingSD3":
            sampling = sampling or node  # the one nearest the sampler patches last: it wins
            node, index = self.graph.source(node, "model")
        if node.class_type != "CheckpointLoaderSimple" or index != 0:
            raise sampler.error(f"its model must come from an SD3 CheckpointLoaderSimple (through ModelSamplingSD3), "
                                f"not from {node.label}")
        name = file_name(node.inputs["ckpt_name"])
        family = self.translator.family(name) if self.translator.family else "sd3"
        if family != "sd3":
            what = "an unknown model" if family is None else f"a {family} model"
            raise node.error(f"ckpt_name {quote(node.inputs['ckpt_name'], 80)} is {what}, not an SD3 model of this "
                             "worker, but the graph uses SD3 nodes (docs/models.md)")
        return node, sampling

    # --- prompts -------------------------------------------------------------------------------------------------
    def _prompt(self, sampler: Node, name: str, loader: Node) -> tuple[Node, str]:
        """The one text encoder behind ``name`` (through conditioning ranges that cover the whole schedule)."""
        leaves = self._leaves(sampler, name)
        encoders = {n.id: n for n, _, _ in leaves}
        if len(encoders) > 1:
            labels = ", ".join(n.label for n in encoders.values())
            raise sampler.error(f"its {name} combines different prompts ({labels}): the engine runs one prompt over "
                                "the whole schedule")
        covered, end = sorted((s, e) for _, s, e in leaves), 0.0
        for start, stop in covered:
            if start > end:
                break
            end = max(end, stop)
        if covered[0][0] != 0 or end < 1:
            raise sampler.error(f"its {name}'s ConditioningSetTimestepRange nodes leave part of the schedule without "
                                "a prompt (ComfyUI then runs none there); the engine runs one prompt from start to end")
        encoder = leaves[0][0]
        inputs = encoder.inputs
        if encoder.class_type == "CLIPTextEncodeSD3":
            if not inputs["clip_l"] == inputs["clip_g"] == inputs["t5xxl"]:
                raise encoder.error("clip_l, clip_g and t5xxl differ: this worker gives SD3's three text encoders the "
                                    "same prompt (no separate prompt_2 / prompt_3); use one text")
            if inputs["empty_padding"] not in ("none", "empty_prompt"):
                raise encoder.error(f"empty_padding {quote(inputs['empty_padding'], 30)} is unknown; use "
                                    "'empty_prompt' or 'none'")
            if inputs["t5xxl"] == "" and inputs["empty_padding"] == "none":
                raise encoder.error("an empty prompt with empty_padding 'none' conditions on zeros in ComfyUI; "
                                    "diffusers encodes the empty prompt: use empty_padding 'empty_prompt'")
            text = inputs["t5xxl"]
        elif encoder.class_type == "CLIPTextEncode":
            text = inputs["text"]
        else:
            raise sampler.error(f"its {name} must come from a CLIPTextEncode or CLIPTextEncodeSD3, not from "
                                f"{encoder.label}")
        if name == "positive" or text:
            check_plain_prompt(encoder, text, "SD3")
        clip, _ = self.graph.source(encoder, "clip")
        if clip is not loader:
            self._check_clips(encoder, clip, loader)
        return encoder, text

    def _leaves(self, sampler: Node, name: str) -> list[tuple[Node, float, float]]:
        """The encoders behind a sampler's conditioning input and the part of the schedule (start, end) each runs:
        ConditioningSetTimestepRange overwrites the range, so the one nearest the sampler is the one that counts."""
        found, pending = [], [(self.graph.source(sampler, name)[0], None)]
        while pending:
            node, span = pending.pop()
            if node.class_type == "ConditioningZeroOut":
                raise node.error("zeroed conditioning has no equivalent in this worker (the engine encodes every "
                                 "prompt, the empty one too); use an empty CLIPTextEncode over the whole schedule")
            if node.class_type == "ConditioningCombine":
                pending += [(self.graph.source(node, k)[0], span) for k in ("conditioning_1", "conditioning_2")]
            elif node.class_type == "ConditioningSetTimestepRange":
                low, high = node.inputs["start"], node.inputs["end"]
                if not 0 <= low <= high <= 1:
                    raise node.error(f"start {quote(low, 20)} and end {quote(high, 20)} must be 0 <= start <= end <= 1")
                pending.append((self.graph.source(node, "conditioning")[0], span or (float(low), float(high))))
            else:
                found.append((node, *(span or (0.0, 1.0))))
        return found

    def _check_clips(self, encoder: Node, node: Node, loader: Node) -> None:
        if node.class_type != "TripleCLIPLoader":
            raise encoder.error(f"its clip must come from a TripleCLIPLoader or the SD3 checkpoint {loader.label}, "
                                f"not from {node.label}")
        names = sorted(base_name(node.inputs[k]) for k in ("clip_name1", "clip_name2", "clip_name3"))
        if names != sorted(STOCK_CLIPS):
            raise node.error(f"clip_name1/2/3 must be {', '.join(STOCK_CLIPS)}, the SD3 text encoders the model "
                             f"{quote(file_name(loader.inputs['ckpt_name']))} runs with here (its own); other encoders "
                             "(fp8 T5s included) cannot be swapped in")

    # --- schedule ------------------------------------------------------------------------------------------------
    def _schedule(self, node: Node, sampling: Node | None, steps: int) -> list[float]:
        """The request's ``sigmas``: ComfyUI's schedule on ModelSamplingDiscreteFlow with the ModelSamplingSD3 node's
        shift, else 3.0 (ComfyUI's for SD3 and SD3.5), whatever the model's own scheduler config says."""
        scheduler = node.inputs["scheduler"]
        if scheduler not in flow.FLOW_SCHEDULERS:
            raise node.error(f"scheduler {quote(scheduler, 40)} has no exact equivalent for SD3 here; supported: "
                             f"{', '.join(flow.FLOW_SCHEDULERS)} (docs/comfyui.md)")
        shift = sampling.inputs["shift"] if sampling is not None else DEFAULT_SHIFT
        if not 0 < shift <= 100:
            raise (sampling or node).error(f"shift {quote(shift, 20)} must be above 0 (at most 100)")
        return flow.flow_schedule(node, scheduler, steps, None, float(shift))


def _token_check(encoders: list[Node], name: str) -> Callable[[Path, set], None]:
    def check(folder: Path, skipped) -> None:
        """Refuse a model run without T5 (ComfyUI then has no T5 tokens, diffusers zeros in their place) and prompts
        longer than ComfyUI and diffusers encode alike (CLIP: one 77-token chunk; T5: 77 tokens)."""
        if "text_encoder_3" in skipped:
            raise encoders[0].error(f"the model {quote(name)} runs without its T5 encoder here, where diffusers "
                                    "conditions on zeros in T5's place and ComfyUI on CLIP alone: no exact equivalent")
        limits = (("tokenizer", CLIP_TOKENS), ("tokenizer_2", CLIP_TOKENS), ("tokenizer_3", T5_TOKENS))
        for sub, limit in limits:
            tokenizer = _tokenizer(str(folder / sub))
            for encoder in encoders:
                text = encoder.inputs.get("text", encoder.inputs.get("t5xxl", ""))
                count = len(tokenizer(text).input_ids)
                if count > limit:
                    raise encoder.error(f"the prompt is {count} tokens for {sub}, over {limit}: ComfyUI encodes the "
                                        "rest too (more chunks, a longer T5 sequence), diffusers cuts it; shorten it")

    return check


@functools.lru_cache(maxsize=12)  # three per SD3 model: a few models' worth
def _tokenizer(folder: str):
    """A model's tokenizer, loaded once per folder (the token check runs on every SD3 workflow job)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
