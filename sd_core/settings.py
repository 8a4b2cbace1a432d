"""Worker configuration: every environment variable sd-serverless reads is read here, and only here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_cache_dir() -> Path:
    # RunPod mounts a network volume at /runpod-volume: a cache there survives worker restarts.
    if Path("/runpod-volume").is_dir():
        return Path("/runpod-volume/sd-cache")
    return Path(os.path.expanduser("~/.cache/sd-serverless"))


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """One worker's configuration. ``Settings.from_env()`` reads it; everything else receives it explicitly."""

    # --- models and weights ---
    models_dir: Path = REPO_ROOT / "models"  # SD_MODELS_DIR: folder of model manifests (*.yaml)
    weights_uri: str = str(REPO_ROOT / "bucket")  # SD_WEIGHTS_URI: base for relative manifest URIs
    default_model: str = "tiny-sd15"  # SD_DEFAULT_MODEL
    preload_models: tuple[str, ...] = ()  # SD_PRELOAD_MODELS: comma list; empty = the default model
    cache_dir: Path = field(default_factory=_default_cache_dir)  # SD_CACHE_DIR
    cache_max_gb: float = 200.0  # SD_CACHE_MAX_GB: LRU eviction budget of the weights cache
    s3_endpoint_url: str | None = None  # SD_S3_ENDPOINT_URL (else boto3's own AWS_ENDPOINT_URL / config)
    allow_pickle: bool = False  # SD_ALLOW_PICKLE: UNSAFE, lets .ckpt/.pt/.bin checkpoints load

    # --- device and speed ---
    device: str = "auto"  # SD_DEVICE: auto | cuda | cpu
    dtype: str = "auto"  # SD_DTYPE: auto | float16 | bfloat16 | float32
    attention: str = "sdpa"  # SD_ATTENTION: sdpa | xformers
    torch_compile: bool = False  # SD_TORCH_COMPILE: torch.compile the UNet
    pipeline_memory_mb: int = 0  # SD_PIPELINE_MEMORY_MB: budget for loaded models, 0 = automatic

    # --- throughput ---
    max_batch_images: int = 8  # SD_MAX_BATCH_IMAGES: micro-batch size limit in images; 1 turns batching off
    batch_wait_ms: float = 5.0  # SD_BATCH_WAIT_MS: how long a batch waits for compatible requests to join

    # --- request limits ---
    max_pixels: int = 4 * 1024 * 1024  # SD_MAX_PIXELS: width * height * num_outputs per request

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        parsers = {"Path": lambda v: Path(v).expanduser(), "bool": _bool, "int": int, "float": float,
                   "tuple[str, ...]": _list}
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("SD_" + f.name.upper(), "")
            if raw != "":
                values[f.name] = parsers.get(str(f.type), str)(raw)
        return cls(**values)

    @property
    def models_to_preload(self) -> tuple[str, ...]:
        return self.preload_models or (self.default_model,)
