"""Worker configuration: every environment variable sd-serverless reads is read here, and only here.

Each setting's variable name, default and meaning live on its field (:func:`setting`); ``docs/configuration.md``
is generated from them (``python scripts/checks/write_config_docs.py``) and a test fails when it is stale.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


RUNPOD_VOLUME = Path("/runpod-volume")
RUNPOD_MODEL_CACHE = RUNPOD_VOLUME / "huggingface-cache" / "hub"  # RunPod's cached models (HF hub cache layout)


def runpod_network_volume(root: Path = RUNPOD_VOLUME) -> bool:
    """Whether a RunPod network volume is at ``root``: a mount point of its own, or a folder holding more than RunPod's
    model cache. RunPod's cached models alone also make /runpod-volume exist (their own mount, local disk, below it):
    that is no volume to fill with a weights cache."""
    if not root.is_dir():
        return False
    if os.path.ismount(root):
        return True
    try:
        return any(entry.name != RUNPOD_MODEL_CACHE.parent.name for entry in root.iterdir())
    except OSError:
        return False


def _default_cache_dir() -> Path:
    # RunPod mounts a network volume at /runpod-volume: a cache there survives worker restarts.
    if runpod_network_volume():
        return RUNPOD_VOLUME / "sd-cache"
    return Path(os.path.expanduser("~/.cache/sd-serverless"))


def _default_compile_cache_dir() -> Path | None:
    return RUNPOD_VOLUME / "sd-compile-cache" if runpod_network_volume() else None


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
    "hf_endpoint": "HF_ENDPOINT",
    "civitai_token": "CIVITAI_TOKEN",
    "hf_hub_cache": "HF_HUB_CACHE",
}


def setting(default=MISSING, *, doc: str, shown: str, section: str = "", default_factory=MISSING, repr: bool = True):
    """A Settings field with its documentation: ``doc`` says what it does, ``shown`` how its default reads."""
    return field(default=default, default_factory=default_factory, repr=repr,
                 metadata={"doc": doc, "shown": shown, "section": section})


@dataclass(frozen=True)
class Settings:
    """One worker's configuration. ``Settings.from_env()`` reads it; everything else receives it explicitly."""

    # --- models and weights ---
    models_dir: Path | str = setting(REPO_ROOT / "models", shown="`./models`", section="Models and weights",
                                     doc="model manifests: a folder, or an `s3://bucket/prefix/` (its `*.yaml` "
                                         "listed) or `https://…/` prefix (its `models.txt` names them), read at cold "
                                         "start: docs/models.md")
    catalog_dir: Path | None = setting(None, shown="none (the images set `catalog/`)",
                                       doc="a second folder of manifests read after SD_MODELS_DIR (a name in both is "
                                           "SD_MODELS_DIR's): the shipped real models (`catalog/`: sdxl-base, "
                                           "flux-schnell, ...; docs/models.md#real-models)")
    weights_uri: str = setting(str(REPO_ROOT / "bucket"), shown="`./bucket`",
                               doc="base URI that relative manifest URIs are joined onto (`s3://bucket/prefix`, "
                                   "`https://…`, a path)")
    default_model: str = setting("tiny-sd15", doc="model used when a request names none", shown="`tiny-sd15`")
    default_refiner: str | None = setting(None, shown="none", doc="refiner model (an sdxl-refiner manifest) a "
                                          "request's `refine` uses when neither it nor its model's manifest names one")
    preload_models: tuple[str, ...] = setting((), doc="comma list of models fetched and loaded at cold start",
                                              shown="the default model")
    cache_dir: Path = setting(default_factory=_default_cache_dir, doc="weights cache",
                              shown="`/runpod-volume/sd-cache` if a network volume is mounted there (RunPod's "
                                    "model cache alone is none), else `~/.cache/sd-serverless`")
    cache_max_gb: float = setting(200.0, doc="weights cache size budget (LRU eviction)", shown="200")
    s3_endpoint_url: str | None = setting(None, shown="boto3's own (`AWS_ENDPOINT_URL`)",
                                          doc="S3-compatible endpoint override (R2, B2, MinIO, SeaweedFS)")
    fetch_concurrency: int = setting(6, doc="parallel ranged GETs (connections) per weights fetch", shown="6")
    fetch_part_mb: float = setting(48.0, doc="size of one ranged GET, MiB (fractions allowed)", shown="48")
    fetch_engine: str = setting("auto", shown="`auto`", doc="what moves S3 bytes: `obstore` (it signs; "
                                "the bytes are spliced into the cache over http, read into one buffer over https: "
                                "little CPU), `boto3`, or `auto` (obstore when installed)")
    fetch_retries: int = setting(4, doc="retries with backoff per request / part before a clear `FetchError`",
                                 shown="4")
    fetch_timeout_s: float = setting(30.0, shown="30", doc="read timeout per request (connect: min(10 s, this)) — a "
                                                           "dead store never hangs a worker")
    fetch_fsync: bool = setting(False, shown="0", doc="fsync downloaded parts before recording them, so a resume "
                                                      "survives a host crash (slower)")
    fetch_progress_s: float = setting(5.0, shown="5", doc="seconds between fetch progress log lines (`sd_core.fetch` "
                                                          "logger: bytes, MB/s, ETA)")
    cache_head_on_hit: bool = setting(False, shown="0", doc="re-check cache hits not pinned by sha256 with one HEAD "
                                                            "(LIST for folders); refetch if changed")
    hf_model_cache: Path = setting(RUNPOD_MODEL_CACHE, shown="`/runpod-volume/huggingface-cache/hub`",
                                   doc="a read-only Hugging Face hub cache (RunPod's *cached models*): an `hf://org/"
                                       "repo@rev` weights URI whose snapshot is there loads from it, with no download "
                                       "and no hub call; never written or evicted")
    hf_hub_cache: Path | None = setting(None, shown="none",
                                       doc="huggingface_hub's own variable: another read-only hub cache searched "
                                           "the same way, after `SD_HF_MODEL_CACHE`")
    allow_pickle: bool = setting(False, shown="0", doc="**unsafe**: allow `.ckpt`/`.pt`/`.bin` pickle checkpoints, "
                                                       "which can run code when loaded")

    # --- device and speed ---
    device: str = setting("auto", doc="`auto` (CUDA if present), `cuda`, `cpu`", shown="auto",
                          section="Device and speed")
    dtype: str = setting("auto", doc="`auto` (fp16 on CUDA, fp32 on CPU; FLUX: bf16 on CUDA), `float16`, "
                         "`bfloat16`, `float32`", shown="auto")
    offload: str = setting("none", shown="none", doc="`model`: CPU offload (each component on the GPU only while it "
                           "runs; slower, for big models on small GPUs), `none`; a manifest's `memory.offload` wins; "
                           "CUDA only (no-op on CPU): docs/models.md")
    quantize: str = setting("none", shown="none", doc="`fp8`: the denoiser's weights in float8 (torchao, CUDA; "
                            "half the memory of bf16, slightly different images), `none`; a manifest's "
                            "`memory.quantize` wins: docs/models.md")
    attention: str = setting("sdpa", doc="`sdpa` (PyTorch) or `xformers` (if installed, CUDA only)", shown="sdpa")
    torch_compile: bool = setting(False, doc="`torch.compile` the UNet (first request pays the compile time)",
                                  shown="0")
    compile_cache_dir: Path | None = setting(
        default_factory=_default_compile_cache_dir,
        shown="`/runpod-volume/sd-compile-cache` if a network volume is mounted there, else none (torch's own temp "
              "folder)",
        doc="with SD_TORCH_COMPILE: torch.compile's caches (Inductor, Triton) kept here, so the next worker reuses "
            "the compiled kernels instead of compiling again (put it on the network volume)")
    load_to_device: bool = setting(False, shown="0",
                                   doc="load a folder model's weights straight onto the device (diffusers "
                                       "`device_map`, no CPU copy in between); ignored with CPU offload or fp8")
    overlap_load: bool = setting(False, shown="0",
                                 doc="cold start: load each component of a folder model (text encoders, VAE) as soon "
                                     "as its files are downloaded, while the rest (the UNet) still downloads (off "
                                     "until measured faster: BENCHMARKS.md)")
    pipeline_memory_mb: int = setting(0, doc="budget for loaded models, ControlNets and preprocessor networks; least "
                                      "recently used are evicted (preprocessor networks first)",
                                      shown="0 = 80 % of GPU memory / 50 % of RAM")
    warmup: bool = setting(True, shown="1",
                           doc="cold start: after loading, one tiny generation per preloaded model (smallest size, 1 "
                               "step; the safety checker too), so the first request pays no first-call costs; a "
                               "failed warm-up fails the cold start")

    # --- throughput ---
    max_batch_images: int = setting(8, shown="8", section="Throughput",
                                    doc="micro-batching: concurrent compatible requests share one denoising call up "
                                        "to this many images; `1` turns it off (batched images may differ by 1–2 "
                                        "levels in a few pixels from a lone run: docs/api.md)")
    batch_wait_ms: float = setting(5.0, shown="5",
                                   doc="how long a forming batch waits for concurrent requests still being prepared "
                                       "to join (a lone request, or a queue that built up while the GPU was busy, "
                                       "starts at once)")

    # --- LoRAs (sd_core/lora.py) ---
    lora_max_loaded: int = setting(16, shown="16", section="LoRAs",
                                   doc="LoRA adapters kept loaded per model; the least recently used is unloaded "
                                       "beyond that")
    lora_fuse_after: int = setting(0, shown="0 = never",
                                   doc="fuse a LoRA set into the weights once N requests in a row used it (faster "
                                       "steps; unfused exactly on the next change)")
    hf_endpoint: str = setting("https://huggingface.co", shown="`https://huggingface.co`",
                               doc="the Hugging Face hub (huggingface_hub's own variable, for a mirror): pasted "
                                   "`huggingface.co/...` LoRA links are fetched from it, under the user-URL policy")
    civitai_endpoint: str = setting("https://civitai.com", shown="`https://civitai.com`",
                                    doc="where pasted `civitai.com/...` LoRA links are fetched from (a mirror), under "
                                        "the user-URL policy")
    civitai_token: str | None = setting(None, repr=False, shown="none",
                                        doc="Civitai API token, sent as a header to `SD_CIVITAI_ENDPOINT` only (not to "
                                            "the CDN it redirects to) when a link brings no `?token=`; never logged")

    # --- VAEs (sd_core/vae.py) ---
    vae_max_loaded: int = setting(2, shown="2", section="VAEs",
                                  doc="alternate VAEs (a manifest's `vaes:`) kept loaded per model, counted in its "
                                      "memory; the least recently used is unloaded beyond that")

    # --- textual-inversion embeddings (sd_core/embeddings.py) ---
    max_embeddings: int = setting(32, shown="32", section="Embeddings",
                                  doc="textual-inversion embeddings kept loaded per model; the least recently used is "
                                      "unloaded beyond that")
    controlnet_max_loaded: int = setting(2, shown="2", section="ControlNet",
                                         doc="ControlNet models kept loaded per worker; the least recently used is "
                                             "unloaded beyond that (they count in the model memory budget)")

    # --- safety checker (sd_core/safety.py) ---
    safety_checker: bool | None = setting(None, shown="Cog: on; RunPod and `python -m sd_core`: off",
                                          section="Safety checker",
                                          doc="run the safety checker on every output (`on`/`off`); requests may "
                                              "skip it with `disable_safety_checker`")
    safety_checker_model: Path | None = setting(None, shown="`<SD_MODELS_DIR>/_safety_checker.yaml`",
                                                doc="the safety checker's manifest (its weights, fetched like a "
                                                    "model's)")

    # --- upscalers (sd_core/upscalers.py) ---
    upscaler_tile: int = setting(192, shown="192", section="Upscalers",
                                 doc="model upscalers run on tiles of this many input pixels square, so memory stays "
                                     "bounded at any image size; `0` runs the whole image at once")
    upscaler_tile_overlap: int = setting(16, shown="16",
                                         doc="pixels of context each tile is run with on every side (cropped off its "
                                             "output): seams vanish once it covers the model's receptive field")
    upscalers_max_loaded: int = setting(2, shown="2",
                                        doc="model upscalers kept loaded; the least recently used is unloaded beyond")

    # --- request limits ---
    max_pixels: int = setting(4 * 1024 * 1024, doc="width × height × num_outputs per request", shown="4194304",
                              section="Requests and user URLs")

    # --- user-supplied URLs (init images, LoRA links): see sd_core/user_urls.py ---
    url_allowed_hosts: tuple[str, ...] = setting(
        (), shown="none",
        doc="user URLs (init images, LoRA links) may point at these hosts although they are private: names, "
            "addresses or networks (`models.internal,10.0.0.0/8`); also the only hosts `http://` is accepted for. "
            "Cloud metadata endpoints stay refused")
    user_s3_buckets: tuple[str, ...] | None = setting(
        None, shown="the bucket of `SD_WEIGHTS_URI` when it is `s3://`, else none",
        doc="the only buckets `s3://` user URLs (LoRAs, embeddings, `model` URLs) may name, read with the worker's own "
            "S3 credentials: `bucket` or `bucket/prefix/` entries (`loras,weights/public/`); `none` refuses every "
            "`s3://` user URL")
    url_max_bytes: int = setting(1024 * 1024 * 1024, doc="size limit of any one download from a user URL",
                                 shown="1073741824")
    url_timeout_s: float = setting(300.0, doc="time limit of any one download from a user URL", shown="300")
    allow_model_urls: bool = setting(True, shown="1", doc="requests may give `model` as the URL of a `.safetensors` "
                                                          "checkpoint (under this URL policy): docs/models.md")
    max_model_url_bytes: int = setting(32 * 1024**3, shown="34359738368",
                                       doc="size limit of a checkpoint downloaded from a `model` URL")

    # --- result delivery and the RunPod worker (sd_core/uploads.py, handler.py) ---
    output_uri: str | None = setting(None, shown="none", section="Results and the RunPod worker",
                                     doc="`s3://bucket/prefix` for result images: uploaded, answered as presigned "
                                         "URLs (RunPod worker)")
    output_url_ttl_s: int = setting(7 * 24 * 3600, doc="lifetime of presigned output URLs (7 days, the SigV4 maximum)",
                                    shown="604800")
    bucket_endpoint_url: str | None = setting(
        None, shown="none",
        doc="RunPod's convention for the output bucket: `https://host/bucket[/prefix]` or "
            "`https://bucket.s3.<region>.amazonaws.com`; with `SD_OUTPUT_URI`, only the endpoint is used "
            "(`SD_BUCKET_ENDPOINT_URL` works too)")
    bucket_access_key_id: str | None = setting(None, repr=False, shown="boto3's own chain",
                                               doc="output bucket access key (needs `s3:PutObject`); never logged")
    bucket_secret_access_key: str | None = setting(None, repr=False, shown="boto3's own chain",
                                                   doc="output bucket secret key; never logged")
    max_response_mb: float = setting(9.0, shown="9", doc="largest inline (base64) job result; a larger one fails with "
                                                         "a message asking for a bucket")
    concurrency: int = setting(1, shown="1", doc="jobs one RunPod worker takes at once (its `concurrency_modifier`); "
                                                 "compatible concurrent jobs share a denoising batch")
    progress_interval_s: float = setting(1.0, doc="least seconds between two progress updates of a RunPod job",
                                         shown="1")
    runpod_log_level: str = setting("INFO", shown="INFO",
                                    doc="the runpod SDK's log level; its own default, DEBUG, logs every job's input "
                                        "and output (base64 images, presigned URLs), so the worker sets INFO")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        parsers = {"Path": lambda v: Path(v).expanduser(), "bool": _bool, "int": int, "float": float,
                   "tuple[str, ...]": _list, "tuple[str, ...] | None": _list, "bool | None": _switch,
                   "Path | None": lambda v: Path(v).expanduser(),
                   "Path | str": lambda v: v if "://" in v else Path(v).expanduser()}
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("SD_" + f.name.upper(), "")
            if raw == "" and f.name in ENV_ALIASES:
                raw = env.get(ENV_ALIASES[f.name], "")
            if raw != "":
                try:
                    values[f.name] = parsers.get(str(f.type), str)(raw)
                except ValueError as exc:
                    raise ValueError(f"{env_name(f.name)}: {exc}") from None
        return cls(**values)

    def with_platform_defaults(self, *, safety_checker: bool) -> Settings:
        """These settings with what the environment left unset filled in by an adapter's platform defaults."""
        return self if self.safety_checker is not None else replace(self, safety_checker=safety_checker)

    @property
    def models_to_preload(self) -> tuple[str, ...]:
        return self.preload_models or (self.default_model,)


def env_name(name: str) -> str:
    """The environment variable a Settings field is documented under (RunPod's own name where it has one)."""
    return ENV_ALIASES.get(name, "SD_" + name.upper())


def configuration_markdown() -> str:
    """docs/configuration.md: every setting's variable, default and meaning, by section, from the fields."""
    lines = ["# Configuration", "",
             "<!-- GENERATED from sd_core/settings.py by scripts/checks/write_config_docs.py: do not edit. -->", "",
             "Every environment variable the worker reads, read in one place (`sd_core/settings.py`, `Settings`). "
             "Booleans take `1`/`true`/`yes`/`on`; lists are comma-separated.", ""]
    for f in fields(Settings):
        if f.metadata["section"]:
            lines += ["", f"## {f.metadata['section']}", "", "| variable | default | meaning |", "|---|---|---|"]
        lines.append(f"| `{env_name(f.name)}` | {f.metadata['shown']} | {f.metadata['doc']} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
