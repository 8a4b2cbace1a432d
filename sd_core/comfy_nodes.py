"""ComfyUI workflow nodes -> GenerationRequests: each output node's chain back to its checkpoint becomes one request."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

from pydantic import ValidationError

from .checkpoints import title_to_name
from .comfy_conditioning import check_sdxl_size, controlnet_units, encoder_text, walk
from .comfy_flux import FluxSampler, uses_flux
from .comfy_graph import Graph, Node
from .comfy_hires import latent_hires, model_hires
from .comfy_images import NamedImages, mask_image
from .comfy_samplers import scheduler_name, sd_schedule
from .comfy_sd3 import SD3Sampler, uses_sd3
from .errors import quote
from .prompt_tags import TAG
from .schema import MAX_SEED, GenerationRequest, describe_validation_error


@dataclass
class Output:
    """One output node's request, and how its images are named."""

    node: Node
    prefix: str
    request: GenerationRequest
    controls: list[Node] = field(default_factory=list)  # the ControlNet loader node of each controlnets unit
    # FLUX without ModelSamplingFlux: schedule(guidance_embeds) -> the request's sigmas (ComfyUI's default shift
    # depends on the model: sd_core/comfy_flux.py)
    schedule: object = None
    tokens: object = None  # SD3: tokens(model folder, skipped components) refusing prompts ComfyUI encodes otherwise


@dataclass
class ModelChain:
    """What a KSampler's model and prompts come from: one checkpoint, its LoRAs, the CLIP layers skipped."""

    checkpoint: Node
    loras: dict = field(default_factory=dict)  # LoRA node id -> [node, UNet scale, text-encoder scale]
    clip_skip: int = 0
    clip: tuple | None = None  # (LoRA node ids, clip skip) of the prompts' CLIP path, once read


def model_name(value: str) -> str:
    """A checkpoint, LoRA or upscaler file name as ComfyUI lists it ("tiny-sd15.safetensors") -> the manifest name."""
    return title_to_name(value.strip().replace("\\", "/").rsplit("/", 1)[-1])


class Translator:
    """Turns a validated Graph (comfy_graph) and the job's named images into one request per output node."""

    def __init__(self, graph: Graph, images, settings=None, upscaler_scale=None, family=None):
        self.graph = graph
        self.family = family  # manifest name -> its family name (None: unknown); None: no catalog
        self.settings = settings
        self.upscaler_scale = upscaler_scale  # name -> a model upscaler's native scale (None: unknown)
        self.images = NamedImages(images, settings)  # the job's named images (comfy_images)
        self.control_loaders: dict[str, list[Node]] = {}  # sampler id -> the loader node of each ControlNet unit

    def outputs(self) -> list[Output]:
        found = []
        for node in self.graph.outputs():
            prefix = str(node.inputs.get("filename_prefix", "ComfyUI"))[:100]
            request, sampler, schedule, tokens = self._output(node)
            found.append(Output(node, prefix, request, self.control_loaders.get(sampler.id, []), schedule, tokens))
        return found

    # --- images out: VAEDecode of a KSampler --------------------------------------------------------------------
    def _output(self, out: Node) -> tuple[GenerationRequest, Node, object, object]:
        decode, _ = self.graph.source(out, "images")
        if decode.class_type in ("ImageScale", "ImageUpscaleWithModel"):
            raise decode.error("upscaling the final image is not supported in a workflow; upscale with a second "
                               "KSampler (hires fix: docs/comfyui.md) or a native upscale job")
        if decode.class_type != "VAEDecode":
            raise out.error(f"its images must come from a VAEDecode of a KSampler, not from {decode.label}")
        sampler, index = self.graph.source(decode, "samples")
        if sampler.class_type == "KSampler" and uses_sd3(self, sampler):
            fields, tokens = SD3Sampler(self, sampler).fields(decode)
            return self._validated(sampler, fields), sampler, None, tokens
        if uses_flux(self, sampler):
            if index != 0:
                raise decode.error(f"its samples must be output 0 of {sampler.label} (denoised_output: not supported)")
            fields, schedule = FluxSampler(self, sampler).fields(decode)
            return self._validated(sampler, fields), sampler, schedule, None
        if sampler.class_type not in ("KSampler", "KSamplerAdvanced"):
            raise decode.error(f"its samples must come from a KSampler or KSamplerAdvanced, not from {sampler.label}")
        fields, model = self.sampler_fields(sampler)
        self.check_vae(decode, model)
        return self._validated(sampler, fields), sampler, None, None

    @staticmethod
    def _validated(sampler: Node, fields: dict) -> GenerationRequest:
        try:
            return GenerationRequest.model_validate(fields)
        except ValidationError as exc:
            raise sampler.error(describe_validation_error(exc)) from None

    def check_vae(self, node: Node, model: ModelChain) -> None:
        source, index = self.graph.source(node, "vae")
        if source is not model.checkpoint or index != 2:
            raise node.error("its vae must be the VAE output (2) of the KSampler's CheckpointLoaderSimple")

    # --- the sampler ---------------------------------------------------------------------------------------------
    def sampler_fields(self, node: Node) -> tuple[dict, ModelChain]:
        inputs = node.inputs
        model = self._model(node)
        (positive, pos_controls), (negative, neg_controls) = (walk(self.graph, node, "positive"),
                                                              walk(self.graph, node, "negative"))
        if inputs["cfg"] < 1:
            raise node.error(f"cfg {quote(inputs['cfg'], 20)} is not supported: below 1 ComfyUI still mixes in the "
                             "negative prompt, where the engine (diffusers) turns guidance off; use 1 or more")
        seed = inputs["seed" if node.class_type == "KSampler" else "noise_seed"]
        if not 0 <= seed <= MAX_SEED:
            raise node.error(f"seed {seed} is outside 0 to {MAX_SEED}, the seeds this worker takes")
        steps = int(inputs["steps"])
        if not 1 <= steps <= 1000:
            raise node.error(f"steps must be 1 to 1000, got {steps}")
        fields = {"prompt": self._text(node, "positive", positive, model),
                  "negative_prompt": self._text(node, "negative", negative, model),
                  "model": model_name(model.checkpoint.inputs["ckpt_name"]), "seed": int(seed),
                  "guidance_scale": inputs["cfg"],
                  "scheduler": scheduler_name(node, inputs["sampler_name"], inputs["scheduler"]),
                  "clip_skip": model.clip_skip,
                  "loras": [{"source": model_name(n.inputs["lora_name"]), "scale": unet, "text_encoder_scale": te}
                            for n, unet, te in model.loras.values()]}
        fields = self._latent(node, fields, model, steps)
        own = self._own_sigmas(node, fields, steps)
        if fields.get("hires") is not None and (own or "sigmas" in fields):
            raise node.error("a two-pass (hires) workflow runs the hires fix's own schedules: scheduler "
                             f"{quote(inputs['scheduler'], 40)} (or the first pass's) is not supported there; use "
                             "normal, karras, exponential or sgm_uniform")
        if fields.get("hires") is not None:
            if pos_controls or neg_controls:
                raise node.error("ControlNets in a two-pass (hires) workflow are not supported by this worker")
            hires = fields["hires"]
            size = (hires.get("width"), hires.get("height"))
            if size[0] is None:  # a model upscaler: the first pass's size times its scale, in whole latent cells
                size = tuple(int(fields[k] * hires["scale"]) // 8 * 8 for k in ("width", "height"))
        else:
            size = (fields["width"], fields["height"])
            units, loaders = controlnet_units(self, node, pos_controls, neg_controls, model, *size,
                                              self._schedule(node, steps))
            if units and own and len(fields["sigmas"]) != self._schedule(node, steps)[0]:
                raise node.error(f"scheduler {quote(inputs['scheduler'], 40)} runs {len(fields['sigmas'])} steps, "
                                 f"not {steps}, at {steps} steps: its ControlNet step windows are not supported")
            if units:
                fields["controlnets"] = units
                self.control_loaders[node.id] = loaders
        for encoder in (positive, negative):
            check_sdxl_size(encoder, *size)
        return fields, model

    def _latent(self, node: Node, fields: dict, model: ModelChain, steps: int) -> dict:
        """``fields`` with the sampler's latent: txt2img, img2img, inpaint or a hires second pass."""
        schedule, run = self._schedule(node, steps)
        latent, _ = self.graph.source(node, "latent_image")
        if latent.class_type == "EmptyLatentImage":
            if run != schedule:
                raise node.error("denoise below 1 (or a start_at_step) on an EmptyLatentImage is not supported: "
                                 "txt2img runs the whole schedule; use denoise 1 (a partial run needs an image)")
            fields.update(num_inference_steps=steps, width=int(latent.inputs["width"]),
                          height=int(latent.inputs["height"]), num_outputs=int(latent.inputs["batch_size"]))
            return fields
        fields.update(num_inference_steps=schedule, strength=_strength(node, run, schedule))
        if latent.class_type in ("LatentUpscale", "LatentUpscaleBy"):
            return latent_hires(self, node, latent, fields, model, run)
        if latent.class_type == "VAEEncode":
            pixels, _ = self.graph.source(latent, "pixels")
            if pixels.class_type == "ImageUpscaleWithModel":
                return model_hires(self, node, latent, pixels, fields, model, run)
            fields.update(self._init_image(latent, model))
        elif latent.class_type == "SetLatentNoiseMask":
            encode, _ = self.graph.source(latent, "samples")
            if encode.class_type != "VAEEncode":
                raise latent.error(f"its samples must come from a VAEEncode of a LoadImage, not {encode.label}")
            fields.update(self._init_image(encode, model), mask=mask_image(self.graph, self.images, latent))
        elif latent.class_type == "VAEEncodeForInpaint":
            if latent.inputs["grow_mask_by"] != 0:
                raise latent.error("grow_mask_by must be 0 (growing the mask is not supported by this worker)")
            if run != schedule:  # it greys the masked pixels out: only a full denoise leaves nothing of them
                raise node.error("a VAEEncodeForInpaint latent needs denoise 1 here (it erases the masked pixels); "
                                 "use SetLatentNoiseMask for a partial denoise")
            fields.update(self._init_image(latent, model), mask=mask_image(self.graph, self.images, latent))
        else:
            raise node.error(f"its latent_image must come from EmptyLatentImage, VAEEncode, SetLatentNoiseMask, "
                             f"VAEEncodeForInpaint or a latent upscale, not from {latent.label}")
        return fields

    def _own_sigmas(self, node: Node, fields: dict, steps: int) -> bool:
        """Euler on a ComfyUI schedule no A1111 schedule equals (comfy_samplers.SIGMA_PAIRS): ``fields`` get ComfyUI's
        sigmas as the request's ``sigmas`` (the step count theirs: beta drops repeats, ddim_uniform spaces by
        len // steps). A partial run keeps ComfyUI's last ``run`` sigmas (strength, as ``_latent``), which is only
        exact when the schedule has its nominal count. False for the other pairs."""
        schedule, run = self._schedule(node, steps)
        sigmas = sd_schedule(node, node.inputs["sampler_name"], node.inputs["scheduler"], schedule)
        if sigmas is None:
            return False
        if len(sigmas) != schedule and run != schedule:
            raise node.error(f"scheduler {quote(node.inputs['scheduler'], 40)} gives {len(sigmas)} steps for "
                             f"{schedule}: a partial run of it (denoise below 1, start_at_step) is not supported")
        fields.update(sigmas=sigmas, num_inference_steps=len(sigmas))
        return True

    def _schedule(self, node: Node, steps: int) -> tuple[int, int]:
        """(steps in the whole schedule, steps run: its last ones), as ComfyUI's samplers count them."""
        if node.class_type == "KSampler":
            denoise = node.inputs["denoise"]
            if not 0 < denoise <= 1:
                raise node.error(f"denoise must be above 0 and at most 1, got {quote(denoise)}")
            return (steps, steps) if denoise == 1 else (int(steps / denoise), steps)  # ComfyUI's own arithmetic
        inputs = node.inputs
        if inputs["add_noise"] != "enable":
            raise node.error(f"add_noise {quote(inputs['add_noise'], 20)} is not supported (only 'enable': a sampler "
                             "that adds its noise)")
        if inputs["return_with_leftover_noise"] not in ("enable", "disable"):  # no effect on the whole range
            raise node.error("return_with_leftover_noise must be 'enable' or 'disable'")
        start, end = int(inputs["start_at_step"]), int(inputs["end_at_step"])
        if end < steps:
            raise node.error(f"end_at_step {end} stops before the last step ({steps}): partial ranges are not "
                             "supported; use an end_at_step of at least steps")
        if not 0 <= start < steps:
            raise node.error(f"start_at_step must be 0 to steps - 1, got {start}")
        return steps, steps - start

    # --- model, LoRAs, CLIP, prompts --------------------------------------------------------------------------------
    def _model(self, sampler: Node) -> ModelChain:
        node, index = self.graph.source(sampler, "model")
        loras: dict = {}
        while node.class_type in ("LoraLoader", "LoraLoaderModelOnly"):
            te = 0.0  # LoraLoaderModelOnly, or a LoraLoader whose CLIP output the prompts do not use: see _text
            loras[node.id] = [node, float(node.inputs["strength_model"]), te]
            node, index = self.graph.source(node, "model")
        if node.class_type != "CheckpointLoaderSimple" or index != 0:
            raise sampler.error(f"its model must come from a CheckpointLoaderSimple (through LoRA loaders), "
                                f"not from {node.label}")
        return ModelChain(node, dict(reversed(loras.items())))  # in the order ComfyUI applies them: checkpoint first

    def _text(self, sampler: Node, name: str, encoder: Node, model: ModelChain) -> str:
        text = encoder_text(encoder)
        if name == "positive" and TAG.search(text):
            raise encoder.error("<lora:...> tags are not ComfyUI syntax (and would apply a LoRA here); use a "
                                "LoraLoader node")
        node, _ = self.graph.source(encoder, "clip")
        loras, skip = [], None
        while node.class_type in ("LoraLoader", "CLIPSetLastLayer"):
            if node.class_type == "CLIPSetLastLayer":
                layer = node.inputs["stop_at_clip_layer"]
                if not -24 <= layer <= -1:
                    raise node.error(f"stop_at_clip_layer must be -1 (the last layer) to -24, got {layer}")
                skip = -int(layer) - 1 if skip is None else skip  # the one nearest the encoder applies
            else:
                loras.append(node)
            node, _ = self.graph.source(node, "clip")
        if node is not model.checkpoint:
            raise encoder.error("its clip must come from the KSampler's CheckpointLoaderSimple (through LoRA "
                                "loaders and CLIPSetLastLayer)")
        clip = (sorted(n.id for n in loras), skip or 0)
        seen = model.clip
        if seen is not None and seen != clip:
            raise encoder.error("the positive and negative prompts must use the same CLIP (same LoRAs and "
                                "CLIPSetLastLayer)")
        if seen is None:
            model.clip, model.clip_skip = clip, skip or 0
            for lora in loras:  # the text-encoder strength of each LoRA on the CLIP path
                entry = model.loras.setdefault(lora.id, [lora, 0.0, 0.0])
                entry[2] = float(lora.inputs["strength_clip"])
        return text

    # --- input images -------------------------------------------------------------------------------------------
    def _init_image(self, encode: Node, model: ModelChain) -> dict:
        self.check_vae(encode, model)
        load, index = self.graph.source(encode, "pixels")
        if load.class_type != "LoadImage":
            raise encode.error(f"its pixels must come from a LoadImage, not from {load.label}")
        data, image = self.images.load(load)
        if image.width % 8 or image.height % 8:
            raise load.error(f"the image is {image.width}x{image.height}; width and height must be multiples of 8 "
                             "(ComfyUI would crop it): crop or resize it first")
        return {"image": base64.b64encode(data).decode(), "width": image.width, "height": image.height}


def _strength(node: Node, run: int, schedule: int) -> float:
    """The img2img strength making diffusers run exactly the last ``run`` of ``schedule`` steps (it runs
    int(schedule * strength) of them), as ComfyUI does."""
    strength = run / schedule
    while int(schedule * strength) < run:  # floating point: never one step short
        strength = math.nextafter(strength, 2.0)
    if strength > 1 or int(schedule * strength) != run:
        raise node.error(f"cannot run {run} of {schedule} steps")
    return strength

