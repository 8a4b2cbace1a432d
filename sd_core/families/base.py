"""The ModelFamily type: everything one model architecture must say, in one place per architecture."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..schedulers import AYS_SD15, SCHEDULER_NAMES

# Engine features a family may lack (ModelFamily.capabilities), with the words a refusal uses. A family without one
# refuses a request that asks for it, naming the feature and the family, before anything is loaded.
FEATURES: dict[str, str] = {
    "prompt_syntax": "A1111 prompt syntax (attention weights like (word:1.2), BREAK, prompt editing, 75-token chunks)",
    "embeddings": "A1111 textual-inversion embeddings",
    "hires": "the hires fix",
    "variation_seeds": "variation seeds (subseed, subseed_strength)",
    "tiling": "seamless tiling",
    "vae": "an alternate VAE",
    "ip_adapter": "IP-Adapter image prompts",
    "max_sequence_length": "max_sequence_length (the T5 text encoder's prompt length)",
}
# What the UNet families (SD1.x, SD2, SDXL) run; max_sequence_length is for T5-conditioned families only.
UNET_FEATURES = frozenset(FEATURES) - {"max_sequence_length"}


def _asked(request) -> dict[str, str]:
    """{feature: the request field asking for it} for the FEATURES ``request`` uses."""
    from ..prompt_syntax import has_syntax
    from ..prompt_tags import TAG

    vae = (request.vae or "").strip().lower()
    asked = {
        "embeddings": "embeddings" if request.embeddings else None,
        "hires": "hires" if request.hires is not None else None,
        "variation_seeds": "subseed_strength" if request.subseed_strength > 0 or request.subseed not in (None, -1)
        else None,
        "tiling": "tiling" if request.tiling else None,
        "vae": "vae" if vae not in ("", "automatic", "none") else None,
        "ip_adapter": "ip_adapters" if request.ip_adapters else None,
        "max_sequence_length": "max_sequence_length" if request.max_sequence_length is not None else None,
        "prompt_syntax": next((name for name in ("prompt", "negative_prompt")
                               if has_syntax(TAG.sub("", getattr(request, name)))), None),
    }
    return {feature: field for feature, field in asked.items() if field}


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One architecture (a manifest's ``architecture``): its diffusers pipelines, defaults, prompt handling, the
    schedulers it runs, its single-file checkpoint signature and its rough memory need.

    Fields are data; the methods are the hooks a family with other needs (SD3's three prompts, FLUX's missing
    negative prompt) overrides in a subclass.
    """

    name: str
    # diffusers pipeline class per mode; img2img/inpaint are built from the txt2img pipeline with from_pipe
    pipelines: dict[str, str]
    width: int  # defaults for a request that leaves them empty (a manifest's `defaults` override them)
    height: int
    num_inference_steps: int
    guidance_scale: float
    # a single-file checkpoint of this family has a key starting with one of these (its text encoder's layout)
    checkpoint_prefixes: tuple[str, ...]
    # rough parameter count of the full pipeline (UNet + text encoders + VAE): memory_bytes() estimates from it
    parameters: int
    # whether requests may skip CLIP layers (clip_skip, A1111's CLIP_stop_at_last_layers): A1111 applies it to SD1.x
    # only (it ignores it for SD2's OpenCLIP and, by default, for SDXL), so other families refuse it
    clip_skip: bool = True
    # Align Your Steps' sigmas for this architecture (A1111 uses the SD 1.5 table for every non-SDXL model)
    ays_sigmas: tuple[float, ...] = AYS_SD15
    # a refiner family: the architectures whose images it refines (sd_core/refiner.py); () for a model of its own
    refines: tuple[str, ...] = ()
    # diffusers ControlNet pipeline class per mode, built with from_pipe on the loaded model (sd_core/controlnet.py)
    controlnet_pipelines: dict[str, str] | None = None
    # an A1111 textual-inversion file's tensors for this family, one per text encoder (sd_core/embeddings.py)
    embedding_keys: tuple[str, ...] = ("clip_l",)
    # the scheduler a manifest gets when it names none
    scheduler: str = "DPM++ 2M Karras"
    # the engine features (FEATURES) its models run; a request asking for another is refused (check_request)
    capabilities: frozenset[str] = UNET_FEATURES
    # components a manifest may leave out (`skip_components`), each with the pipeline arguments then given as None
    optional_components: dict[str, tuple[str, ...]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """The request defaults manifests start from."""
        return {"width": self.width, "height": self.height, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler}

    def supports(self, feature: str) -> bool:
        """Whether this family's models run ``feature`` (a key of FEATURES)."""
        return feature in self.capabilities

    def check_request(self, request, model: str) -> None:
        """InvalidRequest on the first field of ``request`` asking for a feature this family lacks, naming the
        feature, the model and the family."""
        from ..errors import InvalidRequest, quote

        for feature, field in _asked(request).items():
            if not self.supports(feature):
                raise InvalidRequest(f"{quote(model)} is a {self.name} model, which does not run {FEATURES[feature]} "
                                     "on this worker", field=field)

    def call_kwargs(self, request) -> dict[str, Any]:
        """Pipeline arguments of this family taken from the request (stage 5), beyond the common ones."""
        return {}

    def infotext_fields(self, request) -> dict[str, Any]:
        """This family's own infotext fields for ``request`` (written with A1111's extra parameters)."""
        return {}

    def build_scheduler(self, name: str, base_config: dict[str, Any]):
        """The scheduler ``name`` (one of ``schedulers()``) built from a loaded model's own scheduler config."""
        from ..schedulers import build_scheduler

        return build_scheduler(name, base_config)

    def pipeline_class(self, mode: str):
        """The diffusers pipeline class for ``mode`` (importing it costs seconds the first time)."""
        import diffusers

        return getattr(diffusers, self.pipelines[mode])

    def controlnet_pipeline_class(self, mode: str):
        """The diffusers ControlNet pipeline class for ``mode``; None when this family has none."""
        import diffusers

        name = (self.controlnet_pipelines or {}).get(mode)
        return getattr(diffusers, name) if name else None

    def prompt_kwargs(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """A batch's prompts (one per image) as pipeline keyword arguments.

        The negative prompt is None when all are empty: SDXL (force_zeros_for_empty_prompt) then zeros the negative
        embedding, as bare diffusers and A1111 do; SD1.x/2.x encode "" either way. Jobs with empty and non-empty
        negative prompts never share a batch (``Job.batch_key``).
        """
        return {"prompt": prompts, "negative_prompt": negative_prompts if any(negative_prompts) else None}

    def clip_skip_limit(self, pipe) -> tuple[int, int] | None:
        """(the text encoder's depth, the most layers a request may skip: one always stays); None: no clip skip."""
        if not self.clip_skip:
            return None
        depth = pipe.text_encoder.config.num_hidden_layers
        return depth, depth - 1

    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names this family can run (every one today; flow-matching families will differ)."""
        return SCHEDULER_NAMES

    def detect(self, keys: Iterable[str]) -> bool:
        """Whether a single-file checkpoint with these state-dict keys belongs to this family."""
        return any(key.startswith(self.checkpoint_prefixes) for key in keys)

    def memory_bytes(self, bytes_per_parameter: int = 2) -> int:
        """A rough estimate of the loaded pipeline's weights (fp16 by default); not used for decisions yet (the
        pipeline pool measures loaded models), meant for placement and cache planning."""
        return self.parameters * bytes_per_parameter
