"""Model manifests (models/*.yaml): what to fetch, from where, with which checksum and default parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import families, storage
from .errors import ManifestError, ModelNotFound, quote
from .schedulers import checked_name
from .schema import describe_validation_error
from .settings import Settings

Architecture = Literal[families.NAMES]  # type: ignore[valid-type]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ManifestT = TypeVar("ManifestT", bound=BaseModel)
log = logging.getLogger("sd_core.manifests")
RESERVED_VAE_NAMES = ("automatic", "none")  # a request's `vae` value for the model's own VAE (as A1111's sd_vae)


def is_own_vae(value: str | None) -> bool:
    """None, "", "Automatic" or "None" (any case): a request's `vae` for the model's own VAE."""
    return value is None or value.strip().lower() in ("", *RESERVED_VAE_NAMES)


class ModelDefaults(BaseModel):
    """Parameters a request gets when it leaves them empty."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: str | None = None  # empty: the family's (DPM++ 2M Karras; Euler for flow-matching families)
    # families with a T5 encoder (FLUX, SD3): its token count (FLUX.1-schnell 256, dev 512, SD3 256)
    max_sequence_length: int | None = Field(None, ge=1, le=512)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return None if value is None else checked_name(value)



class MemoryOptions(BaseModel):
    """How a large model fits a smaller GPU (docs/models.md): CPU offload and weight-only quantization, CUDA only."""

    model_config = ConfigDict(extra="forbid")

    offload: Literal["none", "model"] | None = Field(
        None, description="model: each component moves to the GPU only while it runs (enable_model_cpu_offload); "
                          "empty: the worker's SD_OFFLOAD")
    quantize: Literal["none", "fp8"] | None = Field(
        None, description="fp8: the denoiser's weights in float8 (torchao, CUDA); empty: the worker's SD_QUANTIZE")


class LoraEntry(BaseModel):
    """A LoRA that belongs to a model: requests name it instead of giving a URI."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    uri: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    scale: float = 1.0
    trigger: str | None = None  # a word the LoRA was trained on, for documentation


class VaeEntry(BaseModel):
    """An alternate VAE of a model: one `.safetensors` file, or a diffusers AutoencoderKL folder (URI ending '/')."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    uri: str = Field(min_length=1, description="a .safetensors file, or a diffusers AutoencoderKL folder ending in '/'")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="single file checksum")
    files: dict[str, str] = Field(default_factory=dict, description="folder: {relative path: sha256}")
    size: int | None = Field(None, ge=0)

    @property
    def is_folder(self) -> bool:
        return self.uri.endswith("/")

    @model_validator(mode="after")
    def _consistent(self):
        if self.name.lower() in RESERVED_VAE_NAMES:
            raise ValueError(f"name: {self.name!r} means the model's own VAE in requests; choose another name")
        if self.is_folder and self.sha256:
            raise ValueError("sha256: a VAE folder pins per-file checksums under `files`")
        if not self.is_folder and self.files:
            raise ValueError("files: only for a VAE folder (a uri ending in '/')")
        return self
class EmbeddingEntry(BaseModel):
    """A textual-inversion embedding (A1111 .safetensors) of a model: used where its name is a word of a prompt."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)  # the trigger word, matched as A1111 does (whole word, any case)
    uri: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    vectors: int | None = Field(None, ge=1, description="for the A1111 listing when the file is not local")
    shape: int | None = Field(None, ge=1, description="vector width, for the A1111 listing when the file is not local")


class ControlNetEntry(BaseModel):
    """A ControlNet for a model's architecture: a diffusers folder (``uri`` ending in '/', optional ``files``
    checksums) or a single .safetensors file with a ``config_uri`` folder holding its config.json."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    uri: str = Field(min_length=1)
    files: dict[str, str] = Field(default_factory=dict)
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    config_uri: str | None = None
    union: bool = False  # a Union ControlNet (SDXL, ControlNetUnionModel): units name their control_type

    @property
    def is_folder(self) -> bool:
        return self.uri.endswith("/")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.is_folder and not self.config_uri:
            raise ValueError("config_uri: required for a single-file ControlNet (loading never asks the hub)")
        if self.is_folder and self.sha256:
            raise ValueError("sha256: a diffusers folder pins per-file checksums under `files`")
        return self


class IpAdapterEntry(BaseModel):
    """An IP-Adapter of a model (image prompts): its weights file (h94 layout: `image_proj.*` + `ip_adapter.*` keys)
    and the CLIP vision image encoder folder it was trained with. Requests name it (sd_core/ip_adapter.py)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    uri: str = Field(min_length=1, description="the adapter's .safetensors file")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    image_encoder_uri: str = Field(min_length=1, description="CLIPVisionModelWithProjection folder, ending in '/'")
    image_encoder_files: dict[str, str] = Field(default_factory=dict, description="{relative path: sha256}")


class ModelManifest(BaseModel):
    """One model: a diffusers folder, or a single-file checkpoint plus the config folder it needs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    architecture: Architecture
    format: Literal["diffusers", "single_file"]
    uri: str = Field(min_length=1, description="diffusers: folder prefix ending in '/'; single_file: the file")
    config_uri: str | None = Field(None, description="single_file only: diffusers config folder (no weights)")
    config_files: dict[str, str] = Field(
        default_factory=dict, description="single_file only: {relative path: sha256} of the config folder's files"
    )
    sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="single_file checksum")
    files: dict[str, str] = Field(default_factory=dict, description="diffusers: {relative path: sha256}")
    variant: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,32}$", description="diffusers: the weight files' "
                                "variant loaded, e.g. fp16 (unet/diffusion_pytorch_model.fp16.safetensors)")
    size: int | None = Field(None, ge=0, description="total bytes, for progress and cache planning")
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    loras: list[LoraEntry] = Field(default_factory=list)
    vaes: list[VaeEntry] = Field(default_factory=list, description="alternate VAEs a request may choose (`vae`)")
    embeddings: list[EmbeddingEntry] = Field(default_factory=list)
    refiner: str | None = Field(None, pattern=NAME_PATTERN, description="the refiner model a request's `refine` uses "
                                "when it names none (an sdxl-refiner manifest)")
    controlnets: list[ControlNetEntry] = Field(default_factory=list)
    ip_adapters: list[IpAdapterEntry] = Field(default_factory=list)
    memory: MemoryOptions = Field(default_factory=MemoryOptions, description="offload / quantize (docs/models.md)")
    skip_components: list[str] = Field(default_factory=list, description="optional components left out, loaded as "
                                       "None (sd3: text_encoder_3, the T5 encoder)")

    @property
    def skipped(self) -> dict[str, None]:
        """The pipeline arguments the skipped components leave empty, for from_pretrained / from_single_file."""
        optional = self.family.optional_components or {}
        return {argument: None for name in self.skip_components for argument in optional[name]}

    @model_validator(mode="after")
    def _consistent(self):
        if self.defaults.max_sequence_length is not None and not self.family.supports("max_sequence_length"):
            raise ValueError(f"defaults.max_sequence_length: {self.architecture} models have no T5 text encoder")
        optional = self.family.optional_components or {}
        for name in self.skip_components:
            if name not in optional:
                raise ValueError(f"skip_components: {name!r} is not an optional component of {self.architecture} "
                                 f"models; optional: {', '.join(optional) or 'none'}")
        if self.format == "single_file" and not self.config_uri:
            raise ValueError("config_uri: required for format single_file (loading never asks the hub for configs)")
        if self.format == "diffusers" and self.sha256:
            raise ValueError("sha256: a diffusers folder pins per-file checksums under `files`")
        if self.format == "single_file" and self.variant:
            raise ValueError("variant: only for a diffusers folder (a single file has no variants)")
        names = [vae.name for vae in self.vaes]
        if len(set(names)) != len(names):
            raise ValueError("vaes: a VAE name is given twice")
        for key, value in self.family.defaults.items():
            if getattr(self.defaults, key) is None:
                setattr(self.defaults, key, value)
        return self

    @property
    def family(self) -> families.ModelFamily:
        """Everything architecture-specific about this model (sd_core/families)."""
        return families.family(self.architecture)


@dataclass(frozen=True)
class LocalModel:
    """A manifest's files, fetched: ``weights`` is the diffusers folder or the single checkpoint file."""

    manifest: ModelManifest
    weights: Path
    config: Path | None


def resolve_uri(uri: str, settings: Settings) -> str:
    """Absolute URIs and paths stay; a relative one is joined onto SD_WEIGHTS_URI."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return settings.weights_uri.rstrip("/") + "/" + uri


def read_manifest(path: Path, model: type[ManifestT], what: str = "manifest") -> ManifestT:
    """A YAML file validated as ``model``; ManifestError naming ``what`` and the file otherwise."""
    try:
        return model.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise ManifestError(f"invalid {what} {path}: {describe_validation_error(exc)}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"cannot read {what} {path}: {exc}") from None


def load_manifest(path: Path) -> ModelManifest:
    return read_manifest(path, ModelManifest)


class ModelCatalog:
    """All manifests of a worker, by name, loaded (and validated) once at startup."""

    def __init__(self, manifests: dict[str, ModelManifest]):
        self.manifests = manifests

    @classmethod
    def from_dir(cls, directory: Path | str, settings: Settings | None = None) -> ModelCatalog:
        """The manifests of a folder, or of an s3:// / https:// prefix (copied locally: sd_core/catalog_storage.py)."""
        from .catalog_storage import is_remote, snapshot

        if is_remote(directory):
            directory = snapshot(str(directory), settings or Settings.from_env())
        directory = Path(directory)
        manifests: dict[str, ModelManifest] = {}
        for path in sorted(directory.glob("*.y*ml")):
            if path.name.startswith("_"):  # not a model: _safety_checker.yaml (sd_core/safety.py)
                continue
            manifest = load_manifest(path)
            if manifest.name in manifests:
                raise ManifestError(f"model name {manifest.name!r} is defined twice (second time in {path})")
            manifests[manifest.name] = manifest
        return cls(manifests)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCatalog:
        """SD_MODELS_DIR's manifests, plus SD_CATALOG_DIR's (the shipped real-model catalog, `catalog/`) when set;
        a name in both is SD_MODELS_DIR's (an operator's manifest overrides a shipped one)."""
        catalog = cls.from_dir(settings.models_dir, settings)
        for path in sorted(Path(settings.catalog_dir).glob("*.y*ml")) if settings.catalog_dir is not None else ():
            architecture = (yaml.safe_load(path.read_text()) or {}).get("architecture")
            if architecture not in families.NAMES:  # a shipped manifest of a family this build does not have
                log.warning("catalog: %s skipped: architecture %r is not in this build", path.name, architecture)
                continue
            manifest = load_manifest(path)
            catalog.manifests.setdefault(manifest.name, manifest)
        return catalog

    def get(self, name: str) -> ModelManifest:
        try:
            return self.manifests[name]
        except KeyError:
            known = ", ".join(sorted(self.manifests)) or "none"
            raise ModelNotFound(f"unknown model {quote(name)}; available: {known}", field="model") from None

    def find_lora(self, name: str, model: ModelManifest) -> LoraEntry | None:
        """A LoRA by name: the model's own first, then any manifest's of the same architecture."""
        candidates = [model] + [m for m in self.manifests.values() if m is not model]
        for manifest in candidates:
            if manifest.architecture != model.architecture:
                continue
            for lora in manifest.loras:
                if lora.name == name:
                    return lora
        return None


    def embeddings_for(self, model: ModelManifest) -> dict[str, EmbeddingEntry]:
        """The embeddings a prompt for ``model`` may name, by lower-cased name: its own, then other manifests' of the
        same architecture (the first of a name wins)."""
        found: dict[str, EmbeddingEntry] = {}
        for manifest in [model] + [m for m in self.manifests.values() if m is not model]:
            if manifest.architecture == model.architecture:
                for entry in manifest.embeddings:
                    found.setdefault(entry.name.lower(), entry)
        return found

    def find_controlnet(self, name: str, model: ModelManifest) -> tuple[ControlNetEntry, ModelManifest] | None:
        """A ControlNet by name and the manifest listing it: the model's own first, then any other manifest's
        (one listed for another architecture is refused when loaded, by its config)."""
        for manifest in [model] + [m for m in self.manifests.values() if m is not model]:
            for entry in manifest.controlnets:
                if entry.name == name:
                    return entry, manifest
        return None


def fetch_vae(entry: VaeEntry, settings: Settings) -> Path:
    """Fetch (or find in the cache) a manifest VAE: its file, or its folder; verified against its checksums."""
    return storage.fetch(resolve_uri(entry.uri, settings), settings, sha256=entry.sha256,
                         size=None if entry.is_folder else entry.size, files=entry.files or None)


def fetch_model(manifest: ModelManifest, settings: Settings, watch=None) -> LocalModel:
    """Fetch (or find in the cache) everything the manifest names; verified against its checksums. ``watch``: told
    each file of a folder download as it lands (storage.fetch; sd_core/component_loading.py)."""
    weights = storage.fetch(
        resolve_uri(manifest.uri, settings),
        settings,
        sha256=manifest.sha256,
        files=manifest.files or None,
        variant=manifest.variant,
        watch=watch,
    )
    config = None
    if manifest.config_uri:
        config = storage.fetch(resolve_uri(manifest.config_uri, settings), settings,
                               files=manifest.config_files or None)
    return LocalModel(manifest=manifest, weights=weights, config=config)
