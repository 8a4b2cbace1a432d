"""ComfyUI conditioning nodes: ControlNet applies (-> native ControlNet units) and SDXL text encoders (-> prompts)."""

from __future__ import annotations

import base64
import math

from .comfy_graph import Graph, Node
from .comfy_samplers import percent_to_sigma, sigmas
from .errors import quote
from .limits import MAX_CONTROL_SCALE, MAX_CONTROLNETS

APPLY = ("ControlNetApply", "ControlNetApplyAdvanced")
LOADERS = ("ControlNetLoader", "DiffControlNetLoader")
ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")


def walk(graph: Graph, sampler: Node, name: str) -> tuple[Node, list[Node]]:
    """The text encoder behind a sampler's ``positive``/``negative`` input, and the ControlNet apply nodes on the
    way (nearest the encoder first: the order ComfyUI chains them in)."""
    node, index = graph.source(sampler, name)
    applied = []
    while node.class_type in APPLY:
        applied.append(node)
        side = "conditioning" if node.class_type == "ControlNetApply" else ("positive", "negative")[index]
        node, index = graph.source(node, side)
    if node.class_type not in ENCODERS:
        raise sampler.error(f"its {name} must come from a CLIPTextEncode (through ControlNet apply nodes), not from "
                            f"{node.label}")
    return node, applied[::-1]


def encoder_text(encoder: Node) -> str:
    """The prompt of a text encoder node; what the engine cannot take exactly is refused."""
    inputs = encoder.inputs
    if encoder.class_type == "CLIPTextEncodeSDXLRefiner":
        raise encoder.error("SDXL refiner checkpoints do not run as a workflow's model on this worker (the engine "
                            "runs the refiner only as the `refiner` stage of a native SDXL request: docs/api.md)")
    if encoder.class_type == "CLIPTextEncodeSDXL":
        if inputs["text_g"] != inputs["text_l"]:
            raise encoder.error("text_g and text_l differ: this worker gives both SDXL text encoders the same "
                                "prompt (it has no separate prompt for CLIP-L, diffusers' prompt); use one text")
        return inputs["text_g"]
    return inputs["text"]


def check_sdxl_size(encoder: Node, width: int, height: int) -> None:
    """CLIPTextEncodeSDXL's size conditioning must be what diffusers gives the pipeline by default (original and
    target size = the sampled image's size, crop (0, 0)), which is also what ComfyUI's CLIPTextEncode gives it."""
    if encoder.class_type != "CLIPTextEncodeSDXL":
        return
    expected = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
                "target_height": height}
    wrong = [(name, value) for name, value in expected.items() if encoder.inputs[name] != value]
    if wrong:
        name, value = wrong[0]
        raise encoder.error(f"{name} {quote(encoder.inputs[name], 20)} is not supported (expected {value}): the size "
                            f"conditioning must be the sampled image's own size ({width}x{height}, target the same, "
                            "crop 0), SDXL's default; other original/target sizes and crops are not request fields "
                            "of this worker")


def controlnet_units(translator, sampler: Node, positive: list[Node], negative: list[Node], model,
                     width: int, height: int, steps: tuple[int, int]) -> tuple[list[dict], list[Node]]:
    """The native ControlNet units of a sampler's conditioning, and each unit's loader node (for errors).

    The engine's ControlNets (diffusers, balanced mode) steer the positive and the negative prompt alike; ComfyUI
    steers the prompts its apply nodes are wired to. Exact only when both prompts pass the same apply nodes in the
    same order (ControlNetApplyAdvanced on both), or at cfg 1 (neither runs the negative prompt). ``steps``: (steps
    in the whole schedule, steps run: its last ones)."""
    from .comfy_nodes import model_name  # comfy_nodes imports this module

    graph = translator.graph
    cfg = sampler.inputs["cfg"]
    if cfg != 1 and [n.id for n in positive] != [n.id for n in negative]:
        _refuse_one_sided(sampler, positive, negative)
    units, loaders = [], []
    for apply in positive:
        strength = apply.inputs["strength"]
        if not 0 <= strength <= MAX_CONTROL_SCALE:
            raise apply.error(f"strength must be 0 to {MAX_CONTROL_SCALE} on this worker, got {quote(strength, 20)}")
        window = (0.0, 1.0)
        if apply.class_type == "ControlNetApplyAdvanced":
            window = _window(apply, sampler.inputs["scheduler"], *steps)
            if "vae" in apply.inputs:
                translator.check_vae(apply, model)
        if strength == 0 or window is None:  # ComfyUI leaves the conditioning as it is / never runs it
            continue
        loader, _ = graph.source(apply, "control_net")
        if loader.class_type not in LOADERS:  # validated links: a CONTROL_NET output is a loader's
            raise apply.error(f"its control_net must come from a ControlNetLoader, not from {loader.label}")
        load, _ = graph.source(apply, "image")
        if load.class_type != "LoadImage":
            raise apply.error(f"its image must come from a LoadImage (the control map itself; preprocessor nodes "
                              f"are not supported), not from {load.label}")
        data, image = translator.images.load(load)
        if image.size != (width, height):
            raise apply.error(f"the control image is {image.width}x{image.height} but the sampler makes "
                              f"{width}x{height} images: ComfyUI would scale and centre-crop it, which this worker "
                              "does not reproduce exactly; send it at the output size")
        units.append({"model": model_name(loader.inputs["control_net_name"]), "image": base64.b64encode(data).decode(),
                      "scale": float(strength), "start": window[0], "end": window[1]})
        loaders.append(loader)
    if len(units) > MAX_CONTROLNETS:
        raise sampler.error(f"{len(units)} ControlNets applied; at most {MAX_CONTROLNETS} on this worker")
    return units, loaders


def _window(apply: Node, scheduler: str, schedule: int, run: int) -> tuple[float, float] | None:
    """ComfyUI's start/end percent -> the engine's (diffusers') start/end step fractions steering the same steps.

    ComfyUI runs the ControlNet at the steps whose noise level lies between its percents' (percent_to_sigma); diffusers
    at step i of n when start <= i / n and (i + 1) / n <= end. Steps a to b (contiguous: the noise falls) are then
    start a / n, end (b + 1) / n; None when it runs at no step. A noise level too close to a boundary to tell (ComfyUI
    computes in float32) is refused."""
    start, end = apply.inputs["start_percent"], apply.inputs["end_percent"]
    if not 0 <= start <= end <= 1:
        raise apply.error(f"start_percent and end_percent must be 0 <= start <= end <= 1, got {quote(start, 20)} and "
                          f"{quote(end, 20)}")
    if (start, end) == (0, 1):
        return 0.0, 1.0
    high, low = percent_to_sigma(start), percent_to_sigma(end)
    levels = sigmas(scheduler, schedule)[-(run + 1):-1]  # the noise levels of the steps run
    for level in levels:
        if any(0 < bound < math.inf and abs(level - bound) <= 1e-4 * bound for bound in (high, low)):
            raise apply.error(f"start_percent {quote(start, 20)} / end_percent {quote(end, 20)} fall on a step's "
                              "noise level, too close to tell whether ComfyUI runs the ControlNet there; move them "
                              "a little")
    active = [i for i, level in enumerate(levels) if low <= level <= high]
    if not active:
        return None
    return active[0] / run, (active[-1] + 1) / run


def _refuse_one_sided(sampler: Node, positive: list[Node], negative: list[Node]):
    pos, neg = {n.id for n in positive}, {n.id for n in negative}
    for node in positive + negative:
        if (node.id in pos) != (node.id in neg):
            side = "positive" if node.id in pos else "negative"
            fix = ("use a ControlNetApplyAdvanced wired to both" if node.class_type == "ControlNetApply"
                   else "wire it to both")
            raise node.error(f"it steers only the {side} prompt of {sampler.label}; this worker's ControlNets "
                             f"(diffusers) steer the positive and the negative prompt alike at a cfg other than 1: "
                             f"{fix}, or use cfg 1 (no negative prompt is run)")
    raise sampler.error("its positive and negative prompts must pass the same ControlNet apply nodes in the same order")
