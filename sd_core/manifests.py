"""Model manifests (models/*.yaml): what to fetch, from where, with which checksum and default parameters."""

from __future__ import annotations

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


class ModelDefaults(BaseModel):
    """Parameters a request gets when it leaves them empty."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: str = "DPM++ 2M Karras"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return checked_name(value)


class LoraEntry(BaseModel):
    """A LoRA that belongs to a model: requests name it instead of giving a URI."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    uri: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    size: int | None = Field(None, ge=0)
    scale: float = 1.0
    trigger: str | None = None  # a word the LoRA was trained on, for documentation


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
    size: int | None = Field(None, ge=0, description="total bytes, for progress and cache planning")
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    loras: list[LoraEntry] = Field(default_factory=list)
    ip_adapters: list[IpAdapterEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self):
        if self.format == "single_file" and not self.config_uri:
            raise ValueError("config_uri: required for format single_file (loading never asks the hub for configs)")
        if self.format == "diffusers" and self.sha256:
            raise ValueError("sha256: a diffusers folder pins per-file checksums under `files`")
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
    def from_dir(cls, directory: Path) -> ModelCatalog:
        manifests: dict[str, ModelManifest] = {}
        for path in sorted(directory.glob("*.y*ml")):
            if path.name.startswith("_"):  # not a model: _safety_checker.yaml (sd_core/safety.py)
                continue
            manifest = load_manifest(path)
            if manifest.name in manifests:
                raise ManifestError(f"model name {manifest.name!r} is defined twice (second time in {path})")
            manifests[manifest.name] = manifest
        return cls(manifests)

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


def fetch_model(manifest: ModelManifest, settings: Settings) -> LocalModel:
    """Fetch (or find in the cache) everything the manifest names; verified against its checksums."""
    weights = storage.fetch(
        resolve_uri(manifest.uri, settings),
        settings,
        sha256=manifest.sha256,
        files=manifest.files or None,
    )
    config = None
    if manifest.config_uri:
        config = storage.fetch(resolve_uri(manifest.config_uri, settings), settings,
                               files=manifest.config_files or None)
    return LocalModel(manifest=manifest, weights=weights, config=config)
