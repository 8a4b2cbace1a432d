"""A ComfyUI workflow job (RunPod worker-comfyui's input and output shapes): translated, generated, delivered."""

from __future__ import annotations

import asyncio
import json
import logging

from .comfy_graph import parse_workflow
from .comfy_nodes import Translator
from .errors import InvalidRequest, ModelNotFound, quote
from .schema import parse_request
from .uploads import check_inline_size, inline_images

log = logging.getLogger("sd_core.comfy")


def is_workflow(data) -> bool:
    """A ComfyUI job input: ``{"workflow": {...}, "images": [...]}`` (images optional)."""
    return isinstance(data, dict) and "workflow" in data


def translate(data: dict, settings=None, upscalers=None, catalog=None) -> list:
    """The job input -> comfy_nodes.Output per output node, every check done but the FLUX / SD3 checks against the
    model's files (no GPU work yet). ``catalog``: the engine's ModelCatalog, telling FLUX and SD3 checkpoints
    and models apart."""
    extra = sorted(set(data) - {"workflow", "images"})
    if extra:
        raise InvalidRequest(f"unknown field {quote(extra[0], 40)} next to workflow and images", field="input")
    graph = parse_workflow(data["workflow"])
    scale = upscalers.scale if upscalers is not None else None
    family = None
    if catalog is not None:
        def family(name: str) -> str | None:
            try:
                return catalog.get(name).family.name
            except ModelNotFound:
                return None
    return Translator(graph, data.get("images"), settings, scale, family).outputs()


def model_folder(engine, name: str):
    """A model's fetched files with its configs (the diffusers folder or a single file's config folder); fetched
    once, for its load too."""
    loader = engine.loader
    local = loader.prefetched.get(name) or loader._fetch(name)
    if name not in engine.pool:
        loader.prefetched[name] = local
    return local.config or local.weights


def has_guidance_embedding(engine, name: str) -> bool:
    """Whether a model's transformer has a guidance embedding (FLUX.1-dev-like), read from its fetched files."""
    folder = model_folder(engine, name)
    try:
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        raise InvalidRequest(f"model {quote(name)}: its transformer config cannot be read, so ComfyUI's default "
                             "schedule for it is unknown", field="workflow") from None
    return bool(transformer.get("guidance_embeds", False))


def scheduled(output, guidance_embeds: bool) -> None:
    """Give a FLUX output without ModelSamplingFlux its sigmas: ComfyUI's default schedule for its model."""
    sigmas = output.schedule(guidance_embeds)
    data = output.request.model_dump(exclude_unset=True) | {"sigmas": sigmas, "num_inference_steps": len(sigmas)}
    output.request = parse_request(data)
    output.schedule = None


def check_tokens(engine, output) -> None:
    """SD3: the prompts' token counts with the model's own tokenizers, and whether it runs without its T5."""
    name = output.request.model
    skipped = set(engine.catalog.get(name).skip_components) if getattr(engine, "catalog", None) else set()
    output.tokens(model_folder(engine, name), skipped)


async def run_workflow(worker, job: dict, data: dict) -> dict:
    """Run a workflow job on ``worker`` (handler.Worker): ``{"images": [{"filename", "type", "data"}]}``, where
    type is ``base64`` or, with an output bucket, ``s3_url`` (a presigned URL)."""
    name = f"job {job.get('id')}"
    upscalers = getattr(worker.engine, "upscalers", None)
    outputs = await asyncio.to_thread(translate, data, worker.settings, upscalers,
                                      getattr(worker.engine, "catalog", None))
    for output in outputs:  # FLUX's default schedule, SD3's prompts: with the model's files, before any generation
        if output.schedule is not None:
            embeds = await asyncio.to_thread(has_guidance_embedding, worker.engine, output.request.model)
            scheduled(output, embeds)
        if output.tokens is not None:
            await asyncio.to_thread(check_tokens, worker.engine, output)
    results: dict[str, object] = {}  # identical requests (two outputs of one chain) generate once
    images, names = [], []
    for output in outputs:
        key = output.request.model_dump_json()
        if key not in results:
            try:
                results[key] = await worker.generate(output.request, name=name)
            except InvalidRequest as exc:
                raise _named(exc, output) from None
        for image in results[key].images:
            images.append(image)
            names.append(f"{output.prefix}_{len(names) + 1:05d}_.{image.extension}")
    if worker.uploader is not None:
        values = await asyncio.to_thread(worker.uploader.upload, images, str(job.get("id", "job")))
        kind = "s3_url"
    else:
        values, kind = inline_images(images), "base64"
    body = {"images": [{"filename": n, "type": kind, "data": v} for n, v in zip(names, values, strict=True)]}
    if worker.uploader is None:
        check_inline_size(len(json.dumps(body)), worker.settings)
    log.info("%s: workflow with %d output node(s), %d image(s)", name, len(outputs), len(images))
    return body


def _named(error: InvalidRequest, output) -> InvalidRequest:
    """An engine error about a ControlNet unit (``controlnets.<i>...``) reworded to name the workflow's loader node;
    other errors unchanged."""
    parts = (error.field or "").split(".")
    if parts[0] != "controlnets" or len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= len(output.controls):
        return error
    return type(error)(f"{output.controls[int(parts[1])].label}: {error.message}", field="workflow")
