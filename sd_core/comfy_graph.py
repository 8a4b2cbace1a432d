"""ComfyUI API-format workflows: parsed and validated (known nodes, inputs, links, no cycles) before any GPU work."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest, quote

MAX_NODES = 200  # far more than any standard graph this worker runs; larger inputs are refused unread
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 10_000  # one string input (a prompt): GenerationRequest's own prompt limit
OUTPUT_NODES = ("SaveImage", "PreviewImage")

# Input kinds: link types (upper case, ComfyUI's) or widget values (lower case, checked by comfy_nodes).
MODEL, CLIP, VAE, COND, LATENT, IMAGE, MASK, UPSCALE, CONTROL = (
    "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "UPSCALE_MODEL", "CONTROL_NET")
NOISE, GUIDER, SAMPLER, SIGMAS = "NOISE", "GUIDER", "SAMPLER", "SIGMAS"  # SamplerCustomAdvanced's inputs
LINK_TYPES = frozenset({MODEL, CLIP, VAE, COND, LATENT, IMAGE, MASK, UPSCALE, CONTROL, NOISE, GUIDER, SAMPLER, SIGMAS})
_SAMPLING = {"seed": "int", "steps": "int", "cfg": "number", "sampler_name": "str", "scheduler": "str"}


@dataclass(frozen=True)
class NodeType:
    """One supported class_type: its inputs (name -> kind), optional inputs (name -> default), optional link inputs
    (name -> kind), and outputs."""

    inputs: dict[str, str]
    outputs: tuple[str, ...]
    optional: dict[str, object] | None = None
    optional_links: dict[str, str] | None = None


NODE_TYPES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": NodeType({"ckpt_name": "str"}, (MODEL, CLIP, VAE)),
    "LoraLoader": NodeType({"model": MODEL, "clip": CLIP, "lora_name": "str", "strength_model": "number",
                            "strength_clip": "number"}, (MODEL, CLIP)),
    "LoraLoaderModelOnly": NodeType({"model": MODEL, "lora_name": "str", "strength_model": "number"}, (MODEL,)),
    "CLIPTextEncode": NodeType({"text": "str", "clip": CLIP}, (COND,)),
    "CLIPSetLastLayer": NodeType({"clip": CLIP, "stop_at_clip_layer": "int"}, (CLIP,)),
    "EmptyLatentImage": NodeType({"width": "int", "height": "int", "batch_size": "int"}, (LATENT,)),
    "KSampler": NodeType({"model": MODEL, **_SAMPLING, "positive": COND, "negative": COND, "latent_image": LATENT,
                          "denoise": "number"}, (LATENT,)),
    "KSamplerAdvanced": NodeType({"model": MODEL, "add_noise": "str", "noise_seed": "int",
                                  **{k: v for k, v in _SAMPLING.items() if k != "seed"}, "positive": COND,
                                  "negative": COND, "latent_image": LATENT, "start_at_step": "int",
                                  "end_at_step": "int", "return_with_leftover_noise": "str"}, (LATENT,)),
    "VAEDecode": NodeType({"samples": LATENT, "vae": VAE}, (IMAGE,)),
    "VAEEncode": NodeType({"pixels": IMAGE, "vae": VAE}, (LATENT,)),
    "VAEEncodeForInpaint": NodeType({"pixels": IMAGE, "vae": VAE, "mask": MASK, "grow_mask_by": "int"}, (LATENT,)),
    "SetLatentNoiseMask": NodeType({"samples": LATENT, "mask": MASK}, (LATENT,)),
    "LoadImage": NodeType({"image": "str"}, (IMAGE, MASK), {"upload": "image"}),
    "LoadImageMask": NodeType({"image": "str", "channel": "str"}, (MASK,), {"upload": "image"}),
    "SaveImage": NodeType({"images": IMAGE}, (), {"filename_prefix": "ComfyUI"}),
    "PreviewImage": NodeType({"images": IMAGE}, ()),
    "ImageScale": NodeType({"image": IMAGE, "upscale_method": "str", "width": "int", "height": "int",
                            "crop": "str"}, (IMAGE,)),
    "LatentUpscale": NodeType({"samples": LATENT, "upscale_method": "str", "width": "int", "height": "int",
                               "crop": "str"}, (LATENT,)),
    "LatentUpscaleBy": NodeType({"samples": LATENT, "upscale_method": "str", "scale_by": "number"}, (LATENT,)),
    "UpscaleModelLoader": NodeType({"model_name": "str"}, (UPSCALE,)),
    "ImageUpscaleWithModel": NodeType({"upscale_model": UPSCALE, "image": IMAGE}, (IMAGE,)),
    "ControlNetLoader": NodeType({"control_net_name": "str"}, (CONTROL,)),
    "DiffControlNetLoader": NodeType({"model": MODEL, "control_net_name": "str"}, (CONTROL,)),
    "ControlNetApply": NodeType({"conditioning": COND, "control_net": CONTROL, "image": IMAGE, "strength": "number"},
                                (COND,)),
    "ControlNetApplyAdvanced": NodeType({"positive": COND, "negative": COND, "control_net": CONTROL, "image": IMAGE,
                                         "strength": "number", "start_percent": "number", "end_percent": "number"},
                                        (COND, COND), optional_links={"vae": VAE}),
    "CLIPTextEncodeSDXL": NodeType({"clip": CLIP, "width": "int", "height": "int", "crop_w": "int", "crop_h": "int",
                                    "target_width": "int", "target_height": "int", "text_g": "str", "text_l": "str"},
                                   (COND,)),
    "CLIPTextEncodeSDXLRefiner": NodeType({"clip": CLIP, "ascore": "number", "width": "int", "height": "int",
                                           "text": "str"}, (COND,)),
    # FLUX (sd_core/comfy_flux.py): separate loaders, distilled guidance, the custom sampler nodes
    "UNETLoader": NodeType({"unet_name": "str", "weight_dtype": "str"}, (MODEL,)),
    "DualCLIPLoader": NodeType({"clip_name1": "str", "clip_name2": "str", "type": "str"}, (CLIP,),
                               {"device": "default"}),
    "VAELoader": NodeType({"vae_name": "str"}, (VAE,)),
    "CLIPTextEncodeFlux": NodeType({"clip": CLIP, "clip_l": "str", "t5xxl": "str", "guidance": "number"}, (COND,)),
    "FluxGuidance": NodeType({"conditioning": COND, "guidance": "number"}, (COND,)),
    "EmptySD3LatentImage": NodeType({"width": "int", "height": "int", "batch_size": "int"}, (LATENT,)),
    "ModelSamplingFlux": NodeType({"model": MODEL, "max_shift": "number", "base_shift": "number", "width": "int",
                                   "height": "int"}, (MODEL,)),
    # SD3 / SD3.5 (sd_core/comfy_sd3.py): three text encoders, the flow shift, conditioning over part of the schedule
    "TripleCLIPLoader": NodeType({"clip_name1": "str", "clip_name2": "str", "clip_name3": "str"}, (CLIP,)),
    "CLIPTextEncodeSD3": NodeType({"clip": CLIP, "clip_l": "str", "clip_g": "str", "t5xxl": "str",
                                   "empty_padding": "str"}, (COND,)),
    "ModelSamplingSD3": NodeType({"model": MODEL, "shift": "number"}, (MODEL,)),
    "ConditioningZeroOut": NodeType({"conditioning": COND}, (COND,)),
    "ConditioningSetTimestepRange": NodeType({"conditioning": COND, "start": "number", "end": "number"}, (COND,)),
    "ConditioningCombine": NodeType({"conditioning_1": COND, "conditioning_2": COND}, (COND,)),
    "RandomNoise": NodeType({"noise_seed": "int"}, (NOISE,)),
    "KSamplerSelect": NodeType({"sampler_name": "str"}, (SAMPLER,)),
    "BasicScheduler": NodeType({"model": MODEL, "scheduler": "str", "steps": "int", "denoise": "number"}, (SIGMAS,)),
    "BasicGuider": NodeType({"model": MODEL, "conditioning": COND}, (GUIDER,)),
    "SamplerCustomAdvanced": NodeType({"noise": NOISE, "guider": GUIDER, "sampler": SAMPLER, "sigmas": SIGMAS,
                                       "latent_image": LATENT}, (LATENT, LATENT)),
}
# Known nodes refused as a whole, with the reason (the node id is named with it).
REFUSED = {
    "Canny": "ComfyUI's Canny node (kornia: grey image, Gaussian blur, thresholds on a 0-1 scale) has no exact "
             "equivalent in this worker's canny preprocessor (OpenCV's: per-channel gradients, no blur, 0-255 "
             "thresholds); send the edge map itself to the ControlNetApply node's LoadImage",
    "ControlNetApplySD3": "SD3 ControlNets run as native `controlnets` units, not in ComfyUI graphs on this worker",
    "SetUnionControlNetType": "union ControlNets are not supported by this worker",
    "ControlNetInpaintingAliMamaApply": "inpainting ControlNets are not supported by this worker",
}


@dataclass(frozen=True)
class Node:
    """One node of a validated workflow."""

    id: str
    class_type: str
    inputs: dict

    @property
    def label(self) -> str:
        known = self.class_type in NODE_TYPES or self.class_type in REFUSED
        return f"node {quote(self.id)} ({self.class_type if known else quote(self.class_type, 60)})"

    def error(self, reason: str) -> InvalidRequest:
        return InvalidRequest(f"{self.label}: {reason}", field="workflow")


class Graph:
    """A validated workflow: every node's class known, every input present, every link to an existing node's
    output of the right type, no cycles, at least one output node."""

    def __init__(self, nodes: dict[str, Node]):
        self.nodes = nodes

    def source(self, node: Node, name: str) -> tuple[Node, int]:
        """The node (and its output index) wired into ``node``'s link input ``name``."""
        node_id, index = node.inputs[name]
        return self.nodes[str(node_id)], index

    def outputs(self) -> list[Node]:
        """The output nodes (SaveImage, PreviewImage), in node-id order (numeric ids by value)."""
        found = [n for n in self.nodes.values() if n.class_type in OUTPUT_NODES]
        return sorted(found, key=lambda n: (0, int(n.id), "") if n.id.isdigit() else (1, 0, n.id))


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2


def parse_workflow(data) -> Graph:
    """Validate a ComfyUI API-format workflow into a Graph; InvalidRequest naming the node otherwise."""
    if not isinstance(data, dict) or not data:
        raise InvalidRequest("expected a ComfyUI API-format workflow: a JSON object of nodes "
                             '({"3": {"class_type": "KSampler", "inputs": {...}}, ...}; docs/comfyui.md)',
                             field="workflow")
    if len(data) > MAX_NODES:
        raise InvalidRequest(f"{len(data)} nodes; at most {MAX_NODES} are accepted", field="workflow")
    nodes: dict[str, Node] = {}
    for key, body in data.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_CHARS:
            raise InvalidRequest(f"node id {quote(key, 20)}: expected 1 to {MAX_ID_CHARS} characters",
                                 field="workflow")
        if not isinstance(body, dict) or not isinstance(body.get("class_type"), str) \
                or not isinstance(body.get("inputs", {}), dict):
            raise InvalidRequest(f"node {quote(key)}: expected {{\"class_type\": ..., \"inputs\": {{...}}}} "
                                 "(is this the API format? ComfyUI: Workflow > Export (API))", field="workflow")
        node = Node(key, body["class_type"][:100], dict(body.get("inputs", {})))
        extra = sorted(set(body) - {"class_type", "inputs", "_meta", "is_changed"})
        if extra:
            raise node.error(f"unknown key {quote(extra[0])} next to class_type and inputs")
        _check_inputs(node)
        nodes[key] = node
    for node in nodes.values():
        _check_links(node, nodes)
    _check_acyclic(nodes)
    graph = Graph(nodes)
    if not graph.outputs():
        raise InvalidRequest(f"no output node: add a {' or '.join(OUTPUT_NODES)} node", field="workflow")
    return graph


def _check_inputs(node: Node) -> None:
    if node.class_type in REFUSED:
        raise node.error(REFUSED[node.class_type])
    spec = NODE_TYPES.get(node.class_type)
    if spec is None:
        raise node.error(f"class_type {quote(node.class_type)} is not supported by this worker; supported: "
                         f"{', '.join(NODE_TYPES)} (docs/comfyui.md)")
    optional, links = spec.optional or {}, spec.optional_links or {}
    unknown = sorted(set(node.inputs) - set(spec.inputs) - set(optional) - set(links))
    if unknown:
        raise node.error(f"unknown input {quote(unknown[0])}; {node.class_type} takes {', '.join(spec.inputs)}")
    for name, kind in spec.inputs.items():
        if name not in node.inputs:
            raise node.error(f"missing input {name!r}")
        value = node.inputs[name]
        if kind in LINK_TYPES:
            if not _is_link(value):
                raise node.error(f"input {name!r} must be a link [\"<node id>\", <output index>] to a {kind}")
        elif _is_link(value):
            raise node.error(f"input {name!r} must be a value, not a link (only the standard nodes are supported)")
        elif not _kind_ok(kind, value):
            raise node.error(f"input {name!r} must be a {'string' if kind == 'str' else kind}, got {quote(value, 40)}")
    for name, default in optional.items():
        if not isinstance(node.inputs.get(name, default), str):
            raise node.error(f"input {name!r} must be a string")
    for name, kind in links.items():
        if name in node.inputs and not _is_link(node.inputs[name]):
            raise node.error(f"input {name!r} must be a link [\"<node id>\", <output index>] to a {kind}")


def _kind_ok(kind: str, value) -> bool:
    if kind == "str":
        return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float) and value == value and abs(value) != float("inf")


def _links(node: Node) -> dict[str, str]:
    """The node's link inputs present (name -> kind), optional ones included."""
    spec = NODE_TYPES[node.class_type]
    found = {name: kind for name, kind in spec.inputs.items() if kind in LINK_TYPES}
    found.update({name: kind for name, kind in (spec.optional_links or {}).items() if name in node.inputs})
    return found


def _check_links(node: Node, nodes: dict[str, Node]) -> None:
    for name, kind in _links(node).items():
        target, index = node.inputs[name]
        if not isinstance(target, str | int) or isinstance(target, bool) or str(target) not in nodes:
            raise node.error(f"input {name!r} links to node {quote(target, 20)}, which is not in the workflow")
        source = nodes[str(target)]
        outputs = NODE_TYPES[source.class_type].outputs
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(outputs):
            has = f"outputs 0 to {len(outputs) - 1}" if outputs else "no outputs"
            raise node.error(f"input {name!r} links to output {quote(index, 20)} of {source.label}, which has {has}")
        if outputs[index] != kind:
            raise node.error(f"input {name!r} needs a {kind} but output {index} of {source.label} is a "
                             f"{outputs[index]}")


def _check_acyclic(nodes: dict[str, Node]) -> None:
    """Iterative depth-first search over the links; InvalidRequest naming a node on the first cycle found."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in nodes:
        if start in state:
            continue
        stack = [(start, iter(_upstream(nodes[start])))]
        state[start] = 1
        while stack:
            current, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                state[current] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise nodes[nxt].error("is part of a cycle (a node's output feeds back into its own inputs)")
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(_upstream(nodes[nxt]))))


def _upstream(node: Node) -> list[str]:
    return [str(node.inputs[name][0]) for name in _links(node)]
