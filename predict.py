"""Replicate / Cog adapter: Cog inputs -> GenerationRequest -> sd_core Engine -> image files (no generation logic)."""

# Every Input() below is written out literally (numbers, strings, lists; no imported constants): `cog build` reads
# this signature statically from the source to make the model's OpenAPI schema, and silently drops bounds it cannot
# resolve. tests/tooling/test_cog_schema.py checks that names, defaults, bounds and choices equal GenerationRequest's,
# and scripts/checks/write_cog_schema.py writes .cog/openapi_schema.json (what `cog build` would) for the local Cog
# server.

import asyncio
import contextvars
import logging
import shutil
import tempfile
import time

import cog
from cog import BaseRunner, Input, Path

import cog_inputs
from sd_core import upscale_job
from sd_core.errors import WorkerUnhealthy
from sd_core.prefetch import Prefetch
from sd_core.schema import GenerationResult, parse_request, resolve_seed
from sd_core.serving import Server, StepProgress, rounded, setup_logging
from sd_core.settings import Settings

log = logging.getLogger("predict")
# image/mask stay `Path` (schema: format uri, Replicate's upload widget), but reach run() as the user's data URI or
# URL text: sd_core fetches URLs under its URL policy, Cog never downloads them itself (see cog_inputs.py).
cog_inputs.install()

# A1111 sampler names, in sd_core.schedulers order (a test keeps this list equal to SCHEDULER_NAMES).
SCHEDULERS = [
    "Euler", "Euler Karras", "Euler Exponential", "Euler Beta", "Euler SGM Uniform", "Euler Align Your Steps",
    "Euler Normal", "Euler a", "Euler a Normal", "Heun", "Heun Karras", "Heun Exponential", "Heun Beta", "Heun Normal",
    "LMS", "LMS Karras", "LMS Exponential", "LMS Beta", "LMS Normal", "DPM++ 2M Karras", "DPM++ 2M Exponential",
    "DPM++ 2M Beta", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Beta",
    "DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun Exponential", "DPM++ 2M SDE Heun Beta", "DPM++ SDE",
    "DPM++ SDE Karras", "DPM++ SDE Exponential", "DPM++ SDE Beta", "DPM++ SDE Normal", "DDIM", "PLMS", "UniPC", "LCM",
    "TCD",
]
OUTPUT_FORMATS = ["png", "webp", "jpeg"]
RESIZE_MODES = ["resize", "crop", "fill", "latent"]  # sd_core.inpainting.RESIZE_MODES
INPAINT_FILLS = ["fill", "original", "latent_noise", "latent_nothing"]  # sd_core.inpainting.INPAINT_FILLS
# Output files are kept this long: Cog reads (and uploads) them after run() returns, then they are removed.
OUTPUT_KEEP_S = 600


class Runner(BaseRunner):
    """setup() is the cold start (fetch, verify and load the preloaded models); run() is one generation."""

    def setup(self) -> None:
        setup_logging()
        settings = Settings.from_env().with_platform_defaults(safety_checker=True)  # Replicate's convention: on
        prefetch = Prefetch(settings)  # the downloads start now, while torch and diffusers are imported
        from sd_core.engine import Engine  # torch + diffusers: seconds of import, so only here

        log.info("cold start: preloading %s", ", ".join(settings.models_to_preload))
        self.server = Server(Engine(prefetch.settings))  # the engine in a thread, cancel, health, errors: serving.py
        self.server.engine.preload(prefetch)
        log.info("ready")

    def healthcheck(self) -> bool:
        """Cog asks this on GET /health-check: False (UNHEALTHY) after an unrecoverable device error."""
        return getattr(self, "server", None) is None or self.server.unhealthy is None

    @cog.concurrent(max=4)
    async def run(
        self,
        prompt: str = Input(default="", max_length=10000, description="Text prompt; A1111 <lora:name:scale> tags work"),
        negative_prompt: str = Input(default="", max_length=10000, description="What the image should not contain"),
        model: str | None = Input(
            default=None, max_length=2048,
            description="Model name, or the https:// / s3:// URL of a .safetensors checkpoint; empty: the default",
        ),
        width: int | None = Input(
            default=None, ge=64, le=2048, description="Width in pixels, multiple of 8; empty: the model's default"
        ),
        height: int | None = Input(
            default=None, ge=64, le=2048, description="Height in pixels, multiple of 8; empty: the model's default"
        ),
        num_inference_steps: int | None = Input(
            default=None, ge=1, le=150, description="Denoising steps; empty: the model's default"
        ),
        guidance_scale: float | None = Input(
            default=None, ge=0.0, le=30.0, description="Classifier-free guidance scale; empty: the model's default"
        ),
        scheduler: str | None = Input(
            default=None, choices=SCHEDULERS, description="A1111 sampler name; empty: the model's default"
        ),
        sigmas: str | None = Input(
            default=None, max_length=4000,
            description="Each step's noise level, comma separated, decreasing, above 0 (FLUX, SD3: <= 1), no final 0",
        ),
        eta: float | None = Input(default=None, ge=0.0, le=1.0, description="DDIM/TCD noise; empty: the default"),
        seed: int | None = Input(
            default=None, ge=-1, le=4294967295, description="Random seed; empty or -1: random (printed in the logs)"
        ),
        subseed: int | None = Input(default=None, ge=-1, le=4294967295, description="Variation seed; -1: random"),
        subseed_strength: float = Input(default=0.0, ge=0.0, le=1.0, description="Variation: 0 = seed, 1 = subseed"),
        num_outputs: int = Input(default=1, ge=1, le=8, description="Number of images; image i uses seed + i"),
        image: Path | None = Input(default=None, description="Init image for img2img, or the image to inpaint"),
        mask: Path | None = Input(default=None, description="Inpainting mask for `image`: white is repainted"),
        strength: float = Input(
            default=0.8, ge=0.0, le=1.0, description="How much img2img/inpaint changes the image (above 0)"
        ),
        resize_mode: str = Input(
            default="resize", choices=RESIZE_MODES,
            description="Init image of another size: resize, crop, fill or latent (A1111's latent upscale)",
        ),
        mask_blur: int = Input(default=0, ge=0, le=64, description="Gaussian blur of the mask (std, pixels)"),
        mask_blur_y: int | None = Input(
            default=None, ge=0, le=64, description="Vertical mask blur when it differs; empty: mask_blur"
        ),
        invert_mask: bool = Input(default=False, description="Invert the mask: repaint the black part"),
        inpaint_fill: str = Input(
            default="original", choices=INPAINT_FILLS, description="Masked area before denoising (docs/api.md)"
        ),
        padding_mask_crop: int | None = Input(
            default=None, ge=0, le=1024, description="Only masked: inpaint the mask's box plus this padding"
        ),
        inpaint_overlay: bool = Input(default=False, description="Keep the original image outside the mask"),
        outpaint_left: int = Input(default=0, ge=0, le=1024, description="Outpaint: pixels added on the left"),
        outpaint_right: int = Input(default=0, ge=0, le=1024, description="Outpaint: pixels added on the right"),
        outpaint_top: int = Input(default=0, ge=0, le=1024, description="Outpaint: pixels added at the top"),
        outpaint_bottom: int = Input(default=0, ge=0, le=1024, description="Outpaint: pixels added at the bottom"),
        lora_weights: str | None = Input(
            default=None,
            min_length=1,
            max_length=2048,
            description="LoRA: a LoRA name, an s3:// or https:// URL, a Hugging Face or Civitai link",
        ),
        lora_scale: float = Input(default=1.0, ge=-5.0, le=5.0, description="Strength of lora_weights"),
        extra_lora: str | None = Input(
            default=None, min_length=1, max_length=2048, description="A second LoRA, applied with lora_weights"
        ),
        extra_lora_scale: float = Input(default=1.0, ge=-5.0, le=5.0, description="Strength of extra_lora"),
        embeddings: str | None = Input(
            default=None, max_length=40000,
            description="Embeddings by URL: name=https://... pairs, comma separated; the name triggers it in a prompt",
        ),
        control_image: Path | None = Input(
            default=None, description="ControlNet control image (the control map itself, e.g. canny edges)"
        ),
        control_model: str | None = Input(
            default=None, min_length=1, max_length=200, description="ControlNet name (GET /controlnet/model_list)"
        ),
        control_scale: float = Input(default=1.0, ge=0.0, le=2.0, description="ControlNet conditioning scale"),
        control_start: float = Input(default=0.0, ge=0.0, le=1.0, description="Fraction of the steps it starts at"),
        control_end: float = Input(default=1.0, ge=0.0, le=1.0, description="Fraction of the steps it stops at"),
        control_preprocessor: str = Input(
            default="none", max_length=64,
            description="Preprocessor for control_image: none (the control map itself), canny, ... (module_list)",
        ),
        control_units: str | None = Input(
            default=None, max_length=20000000,
            description="More ControlNet units as a JSON list of native units (docs/api.md), after control_image's",
        ),
        ip_adapter_image: Path | None = Input(
            default=None, description="Image prompt (IP-Adapter): a style or subject reference image"
        ),
        ip_adapter_scale: float = Input(
            default=1.0, ge=0.0, le=2.0, description="Strength of ip_adapter_image; 0: not applied at all"
        ),
        clip_skip: int = Input(default=0, ge=0, le=11, description="CLIP layers to skip (A1111's clip skip - 1)"),
        max_sequence_length: int | None = Input(
            default=None, ge=1, le=512, description="T5 prompt tokens (FLUX, SD3); empty: the model's default"
        ),
        tiling: bool = Input(default=False, description="Seamless tiling: the image wraps around its edges"),
        vae: str | None = Input(
            default=None, max_length=200, description="VAE from the model's manifest; empty/Automatic: the model's own"
        ),
        hires_scale: float = Input(default=0.0, ge=0.0, le=4.0, description="Hires fix upscale factor (1-4); 0: off"),
        hires_upscaler: str = Input(
            default="Latent", min_length=1, max_length=100, description="Hires fix upscaler (docs/api.md)"
        ),
        hires_steps: int = Input(default=0, ge=0, le=150, description="Hires fix second-pass steps; 0: the same"),
        hires_denoising_strength: float = Input(
            default=0.7, ge=0.0, le=1.0, description="How much the hires second pass changes the image (above 0)"
        ),
        refine: str = Input(
            default="no_refiner", choices=["no_refiner", "expert_ensemble_refiner", "base_image_refiner"],
            description="SDXL refiner pass: no_refiner, expert_ensemble_refiner or base_image_refiner",
        ),
        refiner: str | None = Input(
            default=None, max_length=200, description="Refiner model; empty: the model's `refiner`, else the worker's"
        ),
        high_noise_frac: float = Input(
            default=0.8, ge=0.0, le=1.0, description="expert_ensemble_refiner: fraction of steps the base model runs"
        ),
        refine_steps: int | None = Input(
            default=None, ge=1, le=150, description="base_image_refiner: refiner steps; empty: num_inference_steps"
        ),
        upscale_only: float = Input(
            default=0.0, ge=0.0, le=16.0, description="Upscale-only: enlarge `image` by this factor; 0: generate"
        ),
        upscaler: str = Input(
            default="Lanczos", min_length=1, max_length=100, description="Upscale-only: None, Lanczos, Nearest, a model"
        ),
        output_format: str = Input(default="png", choices=OUTPUT_FORMATS, description="Image file format"),
        output_quality: int = Input(default=90, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless)"),
        disable_safety_checker: bool = Input(
            default=False,
            description="Skip the safety checker (which blacks out flagged images); ignored where it is off",
        ),
    ) -> list[Path]:
        if self.server.unhealthy is not None:
            raise WorkerUnhealthy(f"this worker must be replaced: {self.server.unhealthy}")
        if upscale_only:  # an upscale-only job (A1111's extra-single-image): sd_core/upscale_job.py
            return await self._upscale(image, upscale_only, upscaler, output_format, output_quality)
        seed = resolve_seed(seed)
        print(f"Using seed: {seed}")
        # The engine may report steps from its batching thread: print in this prediction's context, so that Cog
        # files the progress lines under this prediction's logs.
        context = contextvars.copy_context()
        progress = StepProgress(lambda update: context.run(print, _progress_bar(update["step"], update["steps"])))
        try:
            request = parse_request({
                "prompt": prompt, "negative_prompt": negative_prompt, "model": model, "width": width, "height": height,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler": scheduler,
                "sigmas": cog_inputs.parse_sigmas(sigmas),
                "seed": seed, "subseed": subseed, "subseed_strength": subseed_strength, "num_outputs": num_outputs,
                "strength": strength, "output_format": output_format, "eta": eta,
                "output_quality": output_quality, "disable_safety_checker": disable_safety_checker,
                "clip_skip": clip_skip, "max_sequence_length": max_sequence_length, "tiling": tiling, "vae": vae,
                "resize_mode": resize_mode,
                "mask_blur": mask_blur,
                "mask_blur_y": mask_blur_y, "invert_mask": invert_mask, "inpaint_fill": inpaint_fill,
                "padding_mask_crop": padding_mask_crop, "inpaint_overlay": inpaint_overlay,
                "outpaint": _outpaint(outpaint_left, outpaint_right, outpaint_top, outpaint_bottom),
                "refine": refine, "refiner": refiner, "high_noise_frac": high_noise_frac, "refine_steps": refine_steps,
                "image": cog_inputs.user_file_text(image, "image"), "mask": cog_inputs.user_file_text(mask, "mask"),
                "loras": [{"source": source, "scale": scale}
                          for source, scale in ((lora_weights, lora_scale), (extra_lora, extra_lora_scale))
                          if source is not None],
                "hires": {"scale": hires_scale, "upscaler": hires_upscaler, "steps": hires_steps,
                          "denoising_strength": hires_denoising_strength} if hires_scale else None,
                "embeddings": cog_inputs.parse_embedding_list(embeddings),
                "controlnets": cog_inputs.control_units(control_image, control_model, control_scale, control_start,
                                                        control_end, control_preprocessor)
                               + cog_inputs.parse_control_units(control_units),
                "ip_adapters": [{"image": cog_inputs.user_file_text(ip_adapter_image, "ip_adapter_image"),
                                 "scale": ip_adapter_scale}] if ip_adapter_image is not None else [],
            })
            return self._outputs(await self.server.generate(request, progress, name="prediction"))
        except Exception as exc:  # Cog reports str(error) as the prediction's error; a cancel is no Exception
            raise self.server.user_error(exc, "prediction") from None

    async def _upscale(self, image, scale: float, upscaler: str, output_format: str, output_quality: int) -> list[Path]:
        """`image` upscaled by `scale` with `upscaler`: one image file, and its timings as metrics."""
        try:
            request = upscale_job.parse_upscale({
                "image": cog_inputs.user_file_text(image, "image") or "", "scale": scale, "upscaler": upscaler,
                "output_format": output_format, "output_quality": output_quality,
            })
            result = await asyncio.to_thread(upscale_job.run_upscale, self.server.engine, request)
        except Exception as exc:
            raise self.server.user_error(exc, "prediction") from None
        self.record_metric("timings", rounded(result.timings))
        path = _new_output_folder() / f"upscaled.{result.image.extension}"
        path.write_bytes(result.image.data)
        return [path]

    def _outputs(self, result: GenerationResult) -> list[Path]:
        """Cog's metrics (seed, timings, has_nsfw_concepts) and one image file per output."""
        self.record_metric("seed", result.seed)
        if result.safety_checked:
            flags = [image.nsfw for image in result.images]
            self.record_metric("has_nsfw_concepts", flags)
            if any(flags):
                print(f"Safety checker: {sum(flags)} of {len(flags)} image(s) flagged and blacked out")
        self.record_metric("timings", rounded(result.timings))
        folder = _new_output_folder()
        outputs = []
        for index, item in enumerate(result.images):
            path = folder / f"out-{index}-{item.seed}.{item.extension}"
            path.write_bytes(item.data)
            outputs.append(path)
        return outputs


def _outpaint(left: int, right: int, top: int, bottom: int) -> dict | None:
    """The four outpaint inputs as GenerationRequest's `outpaint` (None when all are 0: no outpainting)."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    return sides if any(sides.values()) else None


def _new_output_folder() -> Path:
    """A fresh folder for one prediction's images; folders older than OUTPUT_KEEP_S are removed on the way."""
    root = Path(tempfile.gettempdir()) / "sd-cog-outputs"
    root.mkdir(exist_ok=True)
    cutoff = time.time() - OUTPUT_KEEP_S
    for old in root.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # removed by a concurrent prediction
            pass
    return Path(tempfile.mkdtemp(dir=root))


def _progress_bar(done: int, total: int, width: int = 20) -> str:
    """A tqdm-style line ("  50%|#####     | 2/4"), the form Replicate reads progress from."""
    filled = width * done // max(total, 1)
    return f"{100 * done // max(total, 1):3d}%|{'#' * filled}{' ' * (width - filled)}| {done}/{total}"
