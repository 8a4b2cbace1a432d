"""Worker configuration: every environment variable sd-serverless reads is read here, and only here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_cache_dir() -> Path:
    # RunPod mounts a network volume at /runpod-volume: a cache there survives worker restarts.
    if Path("/runpod-volume").is_dir():
        return Path("/runpod-volume/sd-cache")
    return Path(os.path.expanduser("~/.cache/sd-serverless"))


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _switch(value: str) -> bool:
    """A strict on/off value: a typo in a safety setting must not silently mean "off"."""
    text = value.strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected on or off, got {value[:20]!r}")


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


# Settings also read under a name that is not SD_<FIELD>: RunPod's convention for an output bucket (the same variables
# its rp_upload helper reads). The SD_<FIELD> name still works and wins when both are set.
ENV_ALIASES = {
    "bucket_endpoint_url": "BUCKET_ENDPOINT_URL",
    "bucket_access_key_id": "BUCKET_ACCESS_KEY_ID",
    "bucket_secret_access_key": "BUCKET_SECRET_ACCESS_KEY",
    "runpod_log_level": "RUNPOD_LOG_LEVEL",
}


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
    fetch_concurrency: int = 16  # SD_FETCH_CONCURRENCY: parallel ranged GETs (connections) per fetch
    fetch_part_mb: float = 16.0  # SD_FETCH_PART_MB: bytes per ranged GET, in MiB (fractions allowed)
    fetch_retries: int = 4  # SD_FETCH_RETRIES: retries (with backoff) per request / part before a FetchError
    fetch_timeout_s: float = 30.0  # SD_FETCH_TIMEOUT_S: read timeout per request (connect: min(10, this))
    fetch_fsync: bool = False  # SD_FETCH_FSYNC: fsync data before recording it (resume survives host crashes)
    fetch_progress_s: float = 5.0  # SD_FETCH_PROGRESS_S: seconds between fetch progress log lines
    cache_head_on_hit: bool = False  # SD_CACHE_HEAD_ON_HIT: re-check a cache hit not pinned by sha256 (HEAD/LIST)
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

    # --- LoRAs (sd_core/lora.py) ---
    lora_max_loaded: int = 16  # SD_LORA_MAX_LOADED: adapters kept loaded per model (LRU); more are unloaded
    lora_fuse_after: int = 0  # SD_LORA_FUSE_AFTER: fuse a LoRA set into the weights after N uses in a row; 0 = never

    # --- safety checker (sd_core/safety.py) ---
    safety_checker: bool | None = None  # SD_SAFETY_CHECKER: on | off; unset: the platform's (Cog on, RunPod off)
    safety_checker_model: Path | None = None  # SD_SAFETY_CHECKER_MODEL; else <models_dir>/_safety_checker.yaml

    # --- request limits ---
    max_pixels: int = 4 * 1024 * 1024  # SD_MAX_PIXELS: width * height * num_outputs per request

    # --- user-supplied URLs (init images, LoRA links): see sd_core/user_urls.py ---
    url_allowed_hosts: tuple[str, ...] = ()  # SD_URL_ALLOWED_HOSTS: hosts/addresses/CIDRs allowed although private
    url_max_bytes: int = 1024 * 1024 * 1024  # SD_URL_MAX_BYTES: size limit of any one user-URL download
    url_timeout_s: float = 300.0  # SD_URL_TIMEOUT_S: time limit of any one user-URL download

    # --- result delivery and the RunPod worker (sd_core/uploads.py, handler.py) ---
    output_uri: str | None = None  # SD_OUTPUT_URI: s3://bucket/prefix for result images (presigned URLs); else base64
    output_url_ttl_s: int = 7 * 24 * 3600  # SD_OUTPUT_URL_TTL_S: lifetime of presigned output URLs (max 7 days)
    bucket_endpoint_url: str | None = None  # BUCKET_ENDPOINT_URL (RunPod's name, see ENV_ALIASES): output bucket
    bucket_access_key_id: str | None = field(default=None, repr=False)  # BUCKET_ACCESS_KEY_ID
    bucket_secret_access_key: str | None = field(default=None, repr=False)  # BUCKET_SECRET_ACCESS_KEY
    max_response_mb: float = 9.0  # SD_MAX_RESPONSE_MB: largest inline (base64) result; RunPod: /run ~10, /runsync ~20
    concurrency: int = 1  # SD_CONCURRENCY: jobs one RunPod worker takes at once (its concurrency_modifier)
    progress_interval_s: float = 1.0  # SD_PROGRESS_INTERVAL_S: least seconds between two progress updates of a job
    # RUNPOD_LOG_LEVEL: the runpod SDK's log level. Its own default, DEBUG, logs every job's input and output
    # (base64 images, presigned URLs); the worker sets INFO unless this says otherwise.
    runpod_log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        parsers = {"Path": lambda v: Path(v).expanduser(), "bool": _bool, "int": int, "float": float,
                   "tuple[str, ...]": _list, "bool | None": _switch, "Path | None": lambda v: Path(v).expanduser()}
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("SD_" + f.name.upper(), "")
            if raw == "" and f.name in ENV_ALIASES:
                raw = env.get(ENV_ALIASES[f.name], "")
            if raw != "":
                try:
                    values[f.name] = parsers.get(str(f.type), str)(raw)
                except ValueError as exc:
                    raise ValueError(f"SD_{f.name.upper()}: {exc}") from None
        return cls(**values)

    def with_platform_defaults(self, *, safety_checker: bool) -> Settings:
        """These settings with what the environment left unset filled in by an adapter's platform defaults."""
        return self if self.safety_checker is not None else replace(self, safety_checker=safety_checker)

    @property
    def models_to_preload(self) -> tuple[str, ...]:
        return self.preload_models or (self.default_model,)
