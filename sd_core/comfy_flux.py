"""ComfyUI FLUX graphs (FLUX loaders, FluxGuidance, ModelSamplingFlux, custom sampler nodes) -> one FLUX request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import comfy_samplers as flow
from .comfy_graph import Graph, Node
from .errors import quote
from .prompt_tags import TAG
from .schema import MAX_SEED

# The stock FLUX.1 component files ComfyUI's FLUX workflows load (comfyanonymous/flux_text_encoders, BFL's ae): every
# FLUX.1 model (dev, schnell and their fine-tunes) has these as its own text encoders and VAE, and the engine runs the
# model's own. Others (fp8 T5s, other encoders or VAEs) are refused: the engine cannot swap them in.
STOCK_CLIPS = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
STOCK_VAE = "ae.safetensors"
DEFAULT_GUIDANCE = 3.5  # ComfyUI's FLUX guidance when no node sets one (model_base.Flux)
# Nodes only FLUX graphs use: a KSampler reached from them translates as FLUX.
FLUX_NODES = frozenset({"UNETLoader", "ModelSamplingFlux", "FluxGuidance", "CLIPTextEncodeFlux", "DualCLIPLoader",
                        "EmptySD3LatentImage", "SamplerCustomAdvanced"})
MODEL_PATCHES = ("ModelSamplingFlux", "LoraLoaderModelOnly", "LoraLoader")


@dataclass
class FluxModel:
    """A FLUX sampler's model: its loader (UNETLoader or CheckpointLoaderSimple), LoRAs and ModelSamplingFlux."""

    loader: Node
    name: str
    sampling: Node | None = None
    loras: list[Node] = field(default_factory=list)  # LoraLoaderModelOnly nodes, nearest the loader first

    @property
    def key(self) -> tuple:
        return self.loader.id, tuple(n.id for n in self.loras), self.sampling.id if self.sampling else None


def uses_flux(translator, sampler: Node) -> bool:
    """Whether ``sampler``'s chain is a FLUX one: a FLUX node on its model, prompt or latent links, or a
    CheckpointLoaderSimple of a FLUX model (the catalog's family, when the translator has one)."""
    if sampler.class_type == "SamplerCustomAdvanced":
        return True
    return chain_reaches(translator, sampler, FLUX_NODES, "flux",
                         ("model", "positive", "conditioning", "clip", "latent_image"))


def chain_reaches(translator, sampler: Node, node_types, family: str, links: tuple[str, ...]) -> bool:
    """Whether the nodes feeding ``sampler`` through its ``links`` inputs (followed node to node) hold one of
    ``node_types``, or a CheckpointLoaderSimple of a ``family`` model (the catalog's, when the translator has one)."""
    graph = translator.graph
    seen, pending = set(), [sampler.id]
    while pending:
        node = graph.nodes[pending.pop()]
        if node.id in seen:
            continue
        seen.add(node.id)
        if node.class_type in node_types:
            return True
        if node.class_type == "CheckpointLoaderSimple" and translator.family is not None \
                and translator.family(file_name(node.inputs["ckpt_name"])) == family:
            return True
        pending += [str(v[0]) for k, v in node.inputs.items() if k in links and isinstance(v, list)]
    return False


def file_name(value: str) -> str:
    """A ComfyUI file name -> the manifest name (comfy_nodes.model_name)."""
    from .comfy_nodes import model_name  # comfy_nodes imports this module

    return model_name(value)


class FluxSampler:
    """One FLUX sampler node (KSampler or SamplerCustomAdvanced) and what feeds it -> the native request's fields."""

    def __init__(self, translator, sampler: Node):
        self.translator = translator
        self.graph: Graph = translator.graph
        self.sampler = sampler

    def fields(self, decode: Node) -> tuple[dict, Callable[[bool], list[float]] | None]:
        """The request fields (ComfyUI's schedule as ``sigmas`` when the graph sets the shift) and, when the model
        decides it, the function giving ``sigmas`` from whether the model has a guidance embedding."""
        graph, node = self.graph, self.sampler
        if node.class_type == "KSampler":
            inputs = node.inputs
            if inputs["cfg"] != 1:
                raise node.error(f"cfg {quote(inputs['cfg'], 20)} on a FLUX model is true classifier-free guidance "
                                 "(the negative prompt run too), which this worker's FLUX does not do; use cfg 1 and "
                                 "a FluxGuidance node for FLUX's distilled guidance")
            model = self._model(node)
            sigma_node, seed_node, latent = node, node, graph.source(node, "latent_image")[0]
            sampler_name, positive = inputs["sampler_name"], node  # negative: unused at cfg 1 (ComfyUI skips it)
        elif node.class_type == "SamplerCustomAdvanced":
            guider, _ = graph.source(node, "guider")
            sigma_node, _ = graph.source(node, "sigmas")
            model = self._model(guider)
            if self._model(sigma_node).key != model.key:
                raise sigma_node.error(f"its model must be the one of {guider.label} (the same loader, LoRAs and "
                                       "ModelSamplingFlux): the schedule and the model would differ")
            seed_node = graph.source(node, "noise")[0]
            sampler_name = graph.source(node, "sampler")[0].inputs["sampler_name"]
            latent, positive = graph.source(node, "latent_image")[0], guider
        else:
            raise decode.error(f"its samples must come from a KSampler or SamplerCustomAdvanced, not {node.label}")
        prompt_name = "positive" if positive is node else "conditioning"
        text, guidance = self._prompt(positive, prompt_name, model)
        steps = check_steps(sigma_node)
        if sigma_node.inputs["denoise"] != 1:
            raise sigma_node.error(f"denoise {quote(sigma_node.inputs['denoise'], 20)} is not supported on FLUX "
                                   "here (FLUX workflows run txt2img: denoise 1 on an empty latent)")
        seed = check_seed(seed_node, "seed" if seed_node is node else "noise_seed")
        if sampler_name != "euler":
            raise (node if node.class_type == "KSampler" else graph.source(node, "sampler")[0]).error(
                f"sampler_name {quote(sampler_name, 40)} does not run FLUX here; supported: euler (FLUX's flow-"
                "matching Euler, diffusers' FlowMatchEulerDiscreteScheduler)")
        width, height, count = check_latent(self.sampler, latent, "FLUX")
        self._check_vae(decode, model)
        fields = {"model": model.name, "prompt": text, "negative_prompt": "", "seed": int(seed),
                  "guidance_scale": float(guidance), "scheduler": "Euler", "num_inference_steps": steps,
                  "width": width, "height": height, "num_outputs": count,
                  "loras": [{"source": file_name(n.inputs["lora_name"]), "scale": float(n.inputs["strength_model"]),
                             "text_encoder_scale": 0.0} for n in model.loras]}
        schedule = self._schedule(sigma_node, model, steps)
        if not callable(schedule):
            fields.update(sigmas=schedule, num_inference_steps=len(schedule))
            schedule = None
        return fields, schedule

    # --- model ---------------------------------------------------------------------------------------------------
    def _model(self, user: Node) -> FluxModel:
        node, index = self.graph.source(user, "model")
        sampling, loras = None, []
        while node.class_type in MODEL_PATCHES:
            if node.class_type == "LoraLoader":
                raise node.error("LoraLoader on a FLUX model is not supported (its CLIP strength has no exact "
                                 "equivalent here); use LoraLoaderModelOnly")
            if node.class_type == "ModelSamplingFlux":
                sampling = sampling or node  # the one nearest the sampler patches last: it wins
            else:
                loras.append(node)
            node, index = self.graph.source(node, "model")
        if node.class_type not in ("UNETLoader", "CheckpointLoaderSimple") or index != 0:
            raise user.error(f"its model must come from a UNETLoader or a FLUX CheckpointLoaderSimple (through "
                             f"ModelSamplingFlux and LoraLoaderModelOnly), not from {node.label}")
        if node.class_type == "UNETLoader":
            dtype = node.inputs["weight_dtype"]
            if dtype != "default":
                raise node.error(f"weight_dtype {quote(dtype, 30)} is not supported: this worker runs the model in its "
                                 "own precision (bfloat16 on GPU); its fp8 option (memory.quantize: docs/"
                                 "performance.md) is torchao's scaled fp8, not ComfyUI's cast, so use 'default'")
            name = file_name(node.inputs["unet_name"])
        else:
            name = file_name(node.inputs["ckpt_name"])
        family = self.translator.family(name) if self.translator.family else "flux"
        if family != "flux":
            field_name = "unet_name" if node.class_type == "UNETLoader" else "ckpt_name"
            what = "an unknown model" if family is None else f"a {family} model"
            raise node.error(f"{field_name} {quote(node.inputs[field_name], 80)} is {what}, not a FLUX model of this "
                             "worker (docs/models.md)")
        return FluxModel(node, name, sampling, loras[::-1])

    # --- prompt and guidance -------------------------------------------------------------------------------------
    def _prompt(self, user: Node, name: str, model: FluxModel) -> tuple[str, float]:
        node, _ = self.graph.source(user, name)
        guidance = None
        while node.class_type == "FluxGuidance":
            guidance = node.inputs["guidance"] if guidance is None else guidance  # the nearest the sampler wins
            node, _ = self.graph.source(node, "conditioning")
        if node.class_type == "CLIPTextEncodeFlux":
            if node.inputs["clip_l"] != node.inputs["t5xxl"]:
                raise node.error("clip_l and t5xxl differ: this worker's FLUX gives both text encoders the same "
                                 "prompt (no separate CLIP-L prompt); use one text")
            text = node.inputs["t5xxl"]
            guidance = node.inputs["guidance"] if guidance is None else guidance
        elif node.class_type == "CLIPTextEncode":
            text = node.inputs["text"]
        else:
            raise user.error(f"its {name} must come from a CLIPTextEncode or CLIPTextEncodeFlux (through "
                             f"FluxGuidance), not from {node.label}")
        check_plain_prompt(node, text, "FLUX")
        self._check_clip(node, model)
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        if not 0 <= guidance <= 100:
            raise node.error(f"guidance must be 0 to 100, got {quote(guidance, 20)}")
        return text, guidance

    def _check_clip(self, encoder: Node, model: FluxModel) -> None:
        node, _ = self.graph.source(encoder, "clip")
        if node is model.loader:  # a FLUX checkpoint's own CLIP (output 1: the link's type was checked)
            return
        if node.class_type != "DualCLIPLoader":
            raise encoder.error(f"its clip must come from a DualCLIPLoader (type flux) or the FLUX checkpoint, not "
                                f"from {node.label}")
        if node.inputs["type"] != "flux":
            raise node.error(f"type {quote(node.inputs['type'], 30)} is not supported; FLUX uses type 'flux'")
        names = sorted(base_name(node.inputs[k]) for k in ("clip_name1", "clip_name2"))
        if names != sorted(STOCK_CLIPS):
            raise node.error(f"clip_name1/clip_name2 must be {' and '.join(STOCK_CLIPS)}, the FLUX.1 text encoders "
                             f"the model {quote(model.name)} runs with here (its own); other encoders (fp8 T5s "
                             "included) cannot be swapped in")

    def _check_vae(self, decode: Node, model: FluxModel) -> None:
        node, index = self.graph.source(decode, "vae")
        if node is model.loader:
            return
        if node.class_type != "VAELoader" or base_name(node.inputs["vae_name"]) != STOCK_VAE:
            raise decode.error(f"its vae must be a VAELoader of {STOCK_VAE} (FLUX.1's VAE, the model's own) or the "
                               f"FLUX checkpoint's, not {node.label}")

    # --- schedule -----------------------------------------------------------------------------------------------
    def _schedule(self, node: Node, model: FluxModel, steps: int) -> list[float] | Callable[[bool], list[float]]:
        """The request's ``sigmas``, ComfyUI's schedule for this model: with the ModelSamplingFlux node's shift;
        without one, ComfyUI's default for the model (dev-like, with a guidance embedding: mu 1.15; schnell-like: the
        unshifted flow), which only the model's files tell: then a function of ``guidance_embeds`` giving them."""
        scheduler = node.inputs["scheduler"]
        if scheduler not in flow.FLOW_SCHEDULERS:
            raise node.error(f"scheduler {quote(scheduler, 40)} has no exact equivalent for FLUX here; supported: "
                             f"{', '.join(flow.FLOW_SCHEDULERS)} (docs/comfyui.md)")
        sampling = model.sampling
        if sampling is not None:
            mu = flow.flux_mu(sampling.inputs["max_shift"], sampling.inputs["base_shift"], sampling.inputs["width"],
                              sampling.inputs["height"])
            return flow.flow_schedule(node, scheduler, steps, mu)
        flow.flow_schedule(node, scheduler, steps, flow.FLUX_DEV_MU)  # refused now rather than after the fetch

        def schedule(guidance_embeds: bool) -> list[float]:
            return flow.flow_schedule(node, scheduler, steps, flow.FLUX_DEV_MU if guidance_embeds else None)

        return schedule


def base_name(value: str) -> str:
    """A file name as ComfyUI lists it, without folders, lower case (for the stock component names)."""
    return value.strip().replace("\\", "/").rsplit("/", 1)[-1].lower()


# --- shared by the flow-matching graphs (FLUX here, SD3: sd_core/comfy_sd3.py) ---------------------------------------
def check_steps(node: Node) -> int:
    steps = int(node.inputs["steps"])
    if not 1 <= steps <= 1000:
        raise node.error(f"steps must be 1 to 1000, got {steps}")
    return steps


def check_seed(node: Node, key: str) -> int:
    seed = node.inputs[key]
    if not 0 <= seed <= MAX_SEED:
        raise node.error(f"seed {seed} is outside 0 to {MAX_SEED}, the seeds this worker takes")
    return int(seed)


def check_plain_prompt(node: Node, text: str, family: str) -> None:
    """Refuse what ComfyUI reads in a prompt and this worker's flow-matching families pass as plain text."""
    if TAG.search(text):
        raise node.error("<lora:...> tags are not ComfyUI syntax (and would apply a LoRA here); use a "
                         "LoraLoaderModelOnly node")
    if any(c in text for c in "()\\"):
        raise node.error(f"parentheses (ComfyUI's prompt weights) are not supported on {family}: this worker passes "
                         f"{family} prompts as plain text; remove them")


def check_latent(sampler: Node, latent: Node, family: str) -> tuple[int, int, int]:
    """An empty latent's (width, height, batch size): txt2img, in multiples of 16 (the transformer's 2x2 patches
    of 8x latent cells)."""
    if latent.class_type not in ("EmptySD3LatentImage", "EmptyLatentImage"):
        raise sampler.error(f"its latent_image must be an EmptySD3LatentImage ({family} workflows run txt2img "
                            f"here), not {latent.label}")
    width, height = int(latent.inputs["width"]), int(latent.inputs["height"])
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise latent.error(f"{width}x{height}: {family} samples sizes in multiples of 16 here")
    return width, height, int(latent.inputs["batch_size"])
