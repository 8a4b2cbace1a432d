"""The safety checker: diffusers' StableDiffusionSafetyChecker, fetched through its manifest, run on output images."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import storage
from .checkpoints import refuse_pickle
from .device import raise_device_failure
from .errors import ManifestError, SDError
from .jobs import Job
from .manifests import NAME_PATTERN, SHA256_PATTERN, read_manifest, resolve_uri
from .pipelines import quiet_loaders
from .settings import Settings

log = logging.getLogger("sd_core.safety")

MANIFEST_NAME = "_safety_checker.yaml"  # in SD_MODELS_DIR unless SD_SAFETY_CHECKER_MODEL names another file
WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"  # what older copies of the checker ship; loaded only with SD_ALLOW_PICKLE=1


class SafetyCheckerManifest(BaseModel):
    """Where the checker's folder lives: config.json, model.safetensors, preprocessor_config.json (the layout of
    CompVis/stable-diffusion-safety-checker), optionally pinned file by file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    uri: str = Field(min_length=1, description="folder prefix ending in '/' (relative: joined onto SD_WEIGHTS_URI)")
    files: dict[str, str] = Field(default_factory=dict, description="{relative path: sha256}")
    size: int | None = Field(None, ge=0, description="total bytes")

    @field_validator("uri")
    @classmethod
    def _folder(cls, value: str) -> str:
        if not value.endswith("/"):
            raise ValueError("must be a folder (end in '/') holding config.json, model.safetensors and "
                             "preprocessor_config.json")
        return value

    @field_validator("files")
    @classmethod
    def _pins(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [rel for rel, digest in value.items() if not re.fullmatch(SHA256_PATTERN, str(digest))]
        if bad:
            raise ValueError(f"not a sha256 (64 lowercase hex digits) for {', '.join(sorted(bad))}")
        return value


class ContentFlagged(SDError):
    """Every image of a request was flagged by the safety checker: there is nothing to return."""


def manifest_path(settings: Settings) -> Path:
    return settings.safety_checker_model or Path(settings.models_dir) / MANIFEST_NAME


def load_manifest(path: Path) -> SafetyCheckerManifest:
    if not path.is_file():
        raise ManifestError(f"the safety checker is on but its manifest {path} does not exist; provide one "
                            "(docs/security.md) or turn the checker off with SD_SAFETY_CHECKER=off")
    return read_manifest(path, SafetyCheckerManifest, "safety checker manifest")


class SafetyChecker:
    """One worker's checker: fetched and loaded once (at cold start, or on first use), then run on every image
    list it is given. Thread-safe: calls run one at a time, outside the engine's GPU lock."""

    def __init__(self, settings: Settings, placement):
        self.settings = settings
        self.placement = placement
        self.manifest: SafetyCheckerManifest | None = None
        self._model = None
        self._processor = None
        self._lock = threading.RLock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def fetch(self) -> Path:
        """Read the manifest and fetch (or find in the cache) the checker's folder, verified against its pins."""
        self.manifest = manifest = load_manifest(manifest_path(self.settings))
        return storage.fetch(resolve_uri(manifest.uri, self.settings), self.settings, files=manifest.files or None)

    def load(self, folder: Path | None = None) -> float:
        """Load the checker onto the engine's device and dtype (fetching it first unless given); seconds taken."""
        with self._lock:
            if self._model is not None:
                return 0.0
            started = time.perf_counter()
            folder = Path(folder or self.fetch())
            self._model, self._processor = self._load(folder)
            seconds = time.perf_counter() - started
            log.info("safety checker %s loaded in %.2fs", self.manifest.name if self.manifest else folder, seconds)
            return seconds

    def _load(self, folder: Path):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        where = self.manifest.uri if self.manifest else str(folder)
        weights = folder / WEIGHTS
        if weights.is_file():
            refuse_pickle(weights, self.settings)  # a pickle saved under the .safetensors name is refused too
        elif not (self.settings.allow_pickle and (folder / PICKLE_WEIGHTS).is_file()):
            raise ManifestError(f"safety checker {where}: no {WEIGHTS} in the folder (pickle weights are refused "
                                "unless SD_ALLOW_PICKLE=1)")
        for required in ("config.json", "preprocessor_config.json"):
            if not (folder / required).is_file():
                raise ManifestError(f"safety checker {where}: no {required} in the folder")
        quiet_loaders()
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(
                str(folder), dtype=self.placement.dtype, local_files_only=True,
                use_safetensors=True if weights.is_file() else None,
            )
            processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # a folder that is not a safety checker (wrong config, wrong shapes)
            raise ManifestError(f"safety checker {where}: cannot load it ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
        model.to(self.placement.device).eval()
        return model, processor

    def check(self, images: list) -> tuple[list, list[bool]]:
        """Run the checker on PIL images: (the images with flagged ones replaced by black ones, flag per image)."""
        import numpy as np
        import torch
        from PIL import Image

        self.load()
        with self._lock:
            try:
                with torch.inference_mode():
                    pixels = self._processor(images=images, return_tensors="pt").pixel_values
                    pixels = pixels.to(self.placement.device, self.placement.dtype)
                    # The checker blacks out the arrays it is given; it gets placeholders and only its flags count.
                    _, flags = self._model(clip_input=pixels, images=[np.zeros(1) for _ in images])
            except Exception as exc:
                raise_device_failure(exc, self.placement, "ran out of memory in the safety checker; try fewer or "
                                     "smaller images", field="num_outputs")
                raise
        flags = [bool(flag) for flag in flags]
        blacked = [Image.new(image.mode, image.size) if flag else image
                   for image, flag in zip(images, flags, strict=True)]
        return blacked, flags

    def post_pass(self, job: Job, images: list) -> list:
        """Stage 6's safety pass on one job's images, unless the request opts out: flagged images come back black
        and the flags go on the job (``job.nsfw``). Every image flagged -> ContentFlagged."""
        if job.request.disable_safety_checker:
            return images
        t = time.perf_counter()
        images, flags = self.check(images)
        job.timings["safety_s"] = time.perf_counter() - t
        if any(flags):
            log.info("safety checker flagged %d of %d image(s)", sum(flags), len(flags))
        if all(flags):
            raise ContentFlagged(f"NSFW content detected: all {len(flags)} image(s) were flagged by the safety "
                                 "checker; try another prompt or seed")
        job.nsfw = flags
        return images
